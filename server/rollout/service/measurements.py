"""Gate inputs from telemetry: each device's p95 invoke latency, mean power and errors.

Read from the 1-minute rollups (``telemetry_rollups``, written by
``server.telemetry.writer``), aggregated in the database so a tick does not carry every
bucket over the wire. A device's p95 over a span is the window-weighted mean of
its per-bucket p95s; power is the mean over windows that measured power. The
baseline uses the same estimator on the release the device ran before it was
told to update, in ``baseline_lookback`` before that moment, so a regression
compares like with like on the same device.

Noise floors: a figure needs ``min_windows`` telemetry windows (fewer give None,
so a gate waits rather than judging one noisy window), and power comes only
from windows measured by a sensor unless the rollout gates estimates too
(``sensor_only=False``): an estimate is a model of the board, not a measurement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from server.db.tables import TelemetryRollup
from server.rollout.service.settings import ServiceConfig
from server.rollout.service.signals import ReleaseMatch
from server.rollout.service.tables import RolloutDevice


class Measured(NamedTuple):
    p95_ms: float | None
    power_mw: float | None
    errors: int


def _sums(sensor_only: bool) -> tuple[Any, ...]:
    tr = TelemetryRollup
    has_p95 = tr.invoke_p95_ms.is_not(None)
    measured = tr.power_source == "sensor"
    power_sum = case((measured, tr.power_mw_sum), else_=0.0) if sensor_only else tr.power_mw_sum
    power_windows = (
        case((measured, tr.power_windows), else_=0) if sensor_only else (tr.power_windows)
    )
    return (
        func.sum(case((has_p95, tr.invoke_p95_ms * tr.windows), else_=0.0)),
        func.sum(case((has_p95, tr.windows), else_=0)),
        func.sum(power_sum),
        func.sum(power_windows),
        func.sum(tr.errors),
    )


def _measured(
    p95_sum: Any,
    p95_windows: Any,
    power_sum: Any,
    power_windows: Any,
    errors: Any,
    *,
    min_windows: int,
) -> Measured:
    enough_p95 = p95_windows and int(p95_windows) >= min_windows
    enough_power = power_windows and int(power_windows) >= min_windows
    p95 = float(p95_sum) / int(p95_windows) if enough_p95 else None
    power = float(power_sum) / int(power_windows) if enough_power else None
    return Measured(p95, power, int(errors or 0))


def baselines(
    s: Session,
    previous: Mapping[str, tuple[str, int]],
    before: datetime,
    cfg: ServiceConfig,
    *,
    sensor_only: bool = True,
) -> dict[str, Measured]:
    """Each device's figures on its previous ``(name, release)`` shortly before ``before``."""
    tr = TelemetryRollup
    ids = sorted(previous)
    found: dict[str, Measured] = {}
    for at in range(0, len(ids), cfg.in_chunk):
        chunk = ids[at : at + cfg.in_chunk]
        query = (
            select(tr.device_id, tr.model, tr.release, *_sums(sensor_only))
            .where(
                tr.device_id.in_(chunk),
                tr.bucket >= before - cfg.baseline_lookback,
                tr.bucket < before,
                tr.release > 0,
            )
            .group_by(tr.device_id, tr.model, tr.release)
        )
        for device_id, model, release, *sums in s.execute(query):
            if previous.get(device_id) == (model, release):
                found[device_id] = _measured(*sums, min_windows=cfg.min_gate_windows)
    return found


def current(
    s: Session,
    rollout_id: str,
    match: ReleaseMatch,
    only: Sequence[str] | None = None,
    chunk: int = 500,
    *,
    min_windows: int = 1,
    sensor_only: bool = True,
) -> dict[str, Measured]:
    """Figures on the rollout's release since each started device was told to install it
    (for every device of the rollout, or ``only`` these)."""
    tr, rd = TelemetryRollup, RolloutDevice
    query = (
        select(tr.device_id, *_sums(sensor_only))
        .join(rd, and_(rd.device_id == tr.device_id, rd.rollout_id == rollout_id))
        .where(
            rd.telemetry_from.is_not(None),
            tr.bucket > rd.telemetry_from,
            tr.model == match.name,
            tr.release == match.release,
        )
        .group_by(tr.device_id)
    )
    n = min_windows
    if only is None:
        rows = s.connection().execute(query)
        return {device_id: _measured(*sums, min_windows=n) for device_id, *sums in rows}
    found: dict[str, Measured] = {}
    for at in range(0, len(only), chunk):
        part = query.where(tr.device_id.in_(only[at : at + chunk]))
        found.update(
            (device_id, _measured(*sums, min_windows=n)) for device_id, *sums in s.execute(part)
        )
    return found

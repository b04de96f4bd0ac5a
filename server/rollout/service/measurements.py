"""Gate inputs from telemetry: each device's p95 invoke latency, mean power and errors.

Read from the 1-minute rollups (``telemetry_rollups``, written by
``server.telemetry.writer``), aggregated in the database so a tick does not carry every
bucket over the wire. A device's p95 over a span is the window-weighted mean of
its per-bucket p95s; power is the mean over windows that measured power. The
baseline uses the same estimator on the release the device ran before it was
told to update, in ``baseline_lookback`` before that moment, so a regression
compares like with like on the same device.
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


def _sums() -> tuple[Any, ...]:
    tr = TelemetryRollup
    has_p95 = tr.invoke_p95_ms.is_not(None)
    return (
        func.sum(case((has_p95, tr.invoke_p95_ms * tr.windows), else_=0.0)),
        func.sum(case((has_p95, tr.windows), else_=0)),
        func.sum(tr.power_mw_sum),
        func.sum(tr.power_windows),
        func.sum(tr.errors),
    )


def _measured(
    p95_sum: Any, p95_windows: Any, power_sum: Any, power_windows: Any, errors: Any
) -> Measured:
    p95 = float(p95_sum) / int(p95_windows) if p95_windows else None
    power = float(power_sum) / int(power_windows) if power_windows else None
    return Measured(p95, power, int(errors or 0))


def baselines(
    s: Session,
    previous: Mapping[str, tuple[str, int]],
    before: datetime,
    cfg: ServiceConfig,
) -> dict[str, Measured]:
    """Each device's figures on its previous ``(name, release)`` shortly before ``before``."""
    tr = TelemetryRollup
    ids = sorted(previous)
    found: dict[str, Measured] = {}
    for at in range(0, len(ids), cfg.in_chunk):
        chunk = ids[at : at + cfg.in_chunk]
        query = (
            select(tr.device_id, tr.model, tr.release, *_sums())
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
                found[device_id] = _measured(*sums)
    return found


def current(
    s: Session,
    rollout_id: str,
    match: ReleaseMatch,
    only: Sequence[str] | None = None,
    chunk: int = 500,
) -> dict[str, Measured]:
    """Figures on the rollout's release since each started device was told to install it
    (for every device of the rollout, or ``only`` these)."""
    tr, rd = TelemetryRollup, RolloutDevice
    query = (
        select(tr.device_id, *_sums())
        .join(rd, and_(rd.device_id == tr.device_id, rd.rollout_id == rollout_id))
        .where(
            rd.telemetry_from.is_not(None),
            tr.bucket > rd.telemetry_from,
            tr.model == match.name,
            tr.release == match.release,
        )
        .group_by(tr.device_id)
    )
    if only is None:
        return {device_id: _measured(*sums) for device_id, *sums in s.connection().execute(query)}
    found: dict[str, Measured] = {}
    for at in range(0, len(only), chunk):
        part = query.where(tr.device_id.in_(only[at : at + chunk]))
        found.update((device_id, _measured(*sums)) for device_id, *sums in s.execute(part))
    return found

"""The engine's tick: lock a rollout, build its facts, ``decide``, apply the decision.

Everything happens in one transaction holding the rollout's lock (see
``records``), so with several server processes exactly one ticks a rollout at
a time, and a device is told to install only if its row still had no start
(``UPDATE ... WHERE started_at IS NULL RETURNING``): no device is assigned
twice, no stage is advanced twice.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from server.db.tables import Assignment, Database, Device, utcnow
from server.errors import ServerError
from server.push import queue as push_queue
from server.rollout.core.decision import Decision, DecisionKind
from server.rollout.core.policy import RolloutFacts, decide
from server.rollout.core.spec import RolloutSpec
from server.rollout.core.states import EngineEvent, InstallStatus, RolloutState
from server.rollout.service import measurements, shadow_store
from server.rollout.service.facts import collect, note_started
from server.rollout.service.records import (
    TICKED,
    locked_rollout,
    set_status,
    spec_of,
    status_of,
    ticked_ids,
)
from server.rollout.service.settings import DEFAULT_CONFIG, ServiceConfig
from server.rollout.service.snapshot import CACHE
from server.rollout.service.tables import Rollout, RolloutDevice

log = logging.getLogger(__name__)

_TRIGGERS = {
    DecisionKind.ADVANCE: EngineEvent.STAGE_PASSED,
    DecisionKind.AWAIT_APPROVAL: EngineEvent.APPROVAL_NEEDED,
    DecisionKind.PAUSE: EngineEvent.GATE_TRIPPED,
    DecisionKind.COMPLETE: EngineEvent.FINISHED,
}


@dataclass(frozen=True)
class TickResult:
    rollout_id: str
    decision: Decision
    started: tuple[str, ...]  # devices told to install in this tick
    changed: bool  # the state or stage changed


def _chunks(items: Sequence[str], size: int) -> list[Sequence[str]]:
    return [items[at : at + size] for at in range(0, len(items), size)]


def start_devices(
    s: Session,
    row: Rollout,
    *,
    spec: RolloutSpec,
    ids: Sequence[str],
    now: datetime,
    cfg: ServiceConfig,
) -> list[dict[str, Any]]:
    """Tell ``ids`` to install the release (devices already started are skipped); the
    rows written, one per device told."""
    started: list[str] = []
    for chunk in _chunks(ids, cfg.in_chunk):
        stmt = (
            update(RolloutDevice)
            .where(
                RolloutDevice.rollout_id == row.id,
                RolloutDevice.device_id.in_(chunk),
                RolloutDevice.started_at.is_(None),
            )
            .values(
                started_at=now,
                telemetry_from=now - cfg.rollup_bucket,
                status=InstallStatus.PENDING.value,
            )
            .returning(RolloutDevice.device_id)
            .execution_options(synchronize_session=False)
        )
        started.extend(s.scalars(stmt))
    if not started:
        return []
    target = (spec.release.name, spec.release.release)
    previous: dict[str, tuple[str | None, int | None, str | None]] = {}
    for chunk in _chunks(started, cfg.in_chunk):
        query = select(
            Device.id, Device.installed_name, Device.installed_release, Device.installed_variant
        ).where(Device.id.in_(chunk))
        previous.update((d, (n, r, v)) for d, n, r, v in s.execute(query))
    before = {
        d: (n, r)
        for d, (n, r, _) in previous.items()
        if n is not None and r is not None and (n, r) != target
    }
    base = measurements.baselines(s, before, now, cfg, sensor_only=not spec.gates_estimates)
    rows = []
    for device_id in started:
        name, release, variant = previous.get(device_id, (None, None, None))
        keep = device_id in before
        measured = base.get(device_id)
        rows.append(
            {
                "rollout_id": row.id,
                "device_id": device_id,
                "previous_name": name if keep else None,
                "previous_release": release if keep else None,
                "previous_variant": variant if keep else None,
                "baseline_p95_ms": measured.p95_ms if measured else None,
                "baseline_power_mw": measured.power_mw if measured else None,
            }
        )
    s.execute(update(RolloutDevice), rows)
    assignments = [
        {
            "target_kind": "device",
            "target_value": device_id,
            "name": spec.release.name,
            "release": spec.release.release,
            "created_at": now,
            "rollout_id": row.id,
        }
        for device_id in started
    ]
    for at in range(0, len(assignments), cfg.insert_chunk):
        s.execute(insert(Assignment), assignments[at : at + cfg.insert_chunk])
    push_queue.request(s, started, "desired", now)  # told at once, not at their next poll
    return rows


def decision_record(
    decision: Decision, started: Mapping[int, int], now: datetime, cfg: ServiceConfig
) -> dict[str, Any]:
    """What is stored as the rollout's last decision: progress counts the devices this
    tick started as in flight; device lists are trimmed."""
    data = decision.to_json()
    data.pop("status", None)
    data.pop("start", None)
    data["started"] = sum(started.values())
    data["at"] = now.isoformat()
    for progress in data["progress"]:
        count = started.get(progress["stage"], 0)
        progress["not_started"] -= count
        progress["in_flight"] += count
    for key in ("gates", "tripped"):
        for gate in data[key]:
            gate["devices"] = gate["devices"][: cfg.max_stored_devices]
    return data


def tick(
    db: Database,
    rollout_id: str,
    cfg: ServiceConfig = DEFAULT_CONFIG,
    now: datetime | None = None,
) -> TickResult | None:
    """One engine step for one rollout; None when another process holds it or it is idle."""
    wall = utcnow()
    now = now or wall
    began = time.perf_counter()
    with locked_rollout(db, rollout_id, wait=False) as got:
        if got is None:
            return None
        s, row = got
        status = status_of(row)
        if status.state not in TICKED:
            CACHE.drop(db.url, rollout_id)
            return None
        spec = spec_of(row)
        snap = CACHE.take(db.url, rollout_id, row.version)
        facts, snap = collect(s, row, spec, cfg, wall, snap=snap)
        shadows = (
            shadow_store.load(s, row.id)
            if spec.shadow is not None and status.shadow_done < status.stage_index
            else {}
        )
        decision = decide(RolloutFacts(row.id, spec, status, facts, shadows), now, cfg.policy)
        ids = decision.start[: cfg.max_starts_per_tick]  # the rest: next tick
        rows = start_devices(s, row, spec=spec, ids=ids, now=now, cfg=cfg) if ids else []
        note_started(snap, rows, now)
        if spec.shadow is not None and decision.status.state is RolloutState.RUNNING:
            shadow_store.sync_assignments(s, row.id, spec, decision.shadow, now)
        started = [str(r["device_id"]) for r in rows]
        changed = decision.status != status
        if changed:
            trigger = _TRIGGERS.get(decision.kind)
            set_status(
                s,
                row,
                decision.status,
                now,
                actor="engine",
                trigger=trigger.value if trigger else decision.kind.value,
                devices=len(started),
                cfg=cfg,
            )
            log.info("rollout %s: %s", row.id, decision.reason)
        stage_of = {f.device_id: f.stage for f in facts} if started else {}
        per_stage = Counter(stage_of[d] for d in started)
        record = decision_record(decision, per_stage, now, cfg)
        record["tick_ms"] = round(1000 * (time.perf_counter() - began), 1)
        row.last_decision = record
        row.last_tick_at = now
        s.flush()
        snap.version = row.version
    # Committed: this process's view is the stored one until someone else writes the row.
    CACHE.give_back(db.url, snap)
    return TickResult(rollout_id, decision, tuple(started), changed)


def tick_all(
    db: Database, cfg: ServiceConfig = DEFAULT_CONFIG, now: datetime | None = None
) -> list[TickResult]:
    """Tick every running, paused or waiting rollout; one failing does not stop the rest."""
    with db.session() as s:
        ids = ticked_ids(s)
    results = []
    for rollout_id in ids:
        try:
            result = tick(db, rollout_id, cfg, now)
        except (ServerError, SQLAlchemyError) as err:
            log.error("rollout %s: tick failed: %s", rollout_id, err)
            continue
        if result is not None:
            results.append(result)
    return results

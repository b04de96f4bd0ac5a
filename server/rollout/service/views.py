"""JSON views of rollouts for the REST API and the CLI.

The detail view is what ``edgefleet rollout status`` prints: per-stage progress,
each gate's measured value against its limit (from the engine's last
decision), why the rollout waits or paused (with the numbers), and history.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db.tables import as_utc
from server.rollout.core.gates import GateResult
from server.rollout.core.states import RolloutState
from server.rollout.core.units import format_duration
from server.rollout.service import measurements
from server.rollout.service.records import spec_of, status_of
from server.rollout.service.settings import DEFAULT_CONFIG
from server.rollout.service.signals import ReleaseMatch
from server.rollout.service.tables import Rollout, RolloutDevice, RolloutHistory

_PROGRESS_KEYS = ("not_started", "in_flight", "succeeded", "failed", "silent", "acknowledged")


def _time(value: datetime | None) -> str | None:
    value = as_utc(value)
    return value.isoformat() if value is not None else None


def summary(row: Rollout) -> dict[str, Any]:
    stages = len(row.spec.get("stages", []))
    return {
        "id": row.id,
        "release": f"{row.name}@{row.release}",
        "state": row.state,
        "stage_index": row.stage_index,
        "stage": row.stage_index + 1,
        "stages": stages,
        "devices": row.devices,
        "reason": str(row.status.get("reason", "")),
        "created_at": _time(row.created_at),
        "updated_at": _time(row.updated_at),
        "last_tick_at": _time(row.last_tick_at),
    }


def gate_text(gate: dict[str, Any], listed: int = 10) -> str:
    """The gate's one-line verdict, as the policy words it."""
    fields = {**gate, "devices": tuple(gate.get("devices") or ())}
    return GateResult(**fields).message(listed)


def _stage_counts(s: Session, rollout_id: str) -> dict[int, tuple[int, int]]:
    rd = RolloutDevice
    query = (
        select(rd.stage, func.count(), func.count(rd.started_at))
        .where(rd.rollout_id == rollout_id)
        .group_by(rd.stage)
    )
    return {stage: (int(total), int(started)) for stage, total, started in s.execute(query)}


def _stage_state(index: int, row: Rollout) -> str:
    if row.state == RolloutState.COMPLETED.value or index < row.stage_index:
        return "passed"
    if index > row.stage_index or row.state == RolloutState.DRAFT.value:
        return "pending"
    return "current"


def detail(s: Session, row: Rollout) -> dict[str, Any]:
    spec, status = spec_of(row), status_of(row)
    decision = row.last_decision or {}
    progress = {int(p["stage"]): p for p in decision.get("progress", [])}
    counts = _stage_counts(s, row.id)
    stages = []
    for i, stage in enumerate(spec.stages):
        total, started = counts.get(i, (0, 0))
        done = progress.get(i, {})
        stages.append(
            {
                "index": i,
                "stage": i + 1,
                "state": _stage_state(i, row),
                "size": str(stage.size),
                "soak": format_duration(stage.soak),
                "timeout": format_duration(stage.timeout),
                "max_failures": str(stage.max_failures),
                "success": None if stage.success is None else str(stage.success),
                "approval": stage.approval,
                "limits": stage.gates.to_json(),
                "devices": total,
                "started": started,
                **{key: done.get(key) for key in _PROGRESS_KEYS},
            }
        )
    gates = [{**g, "text": gate_text(g)} for g in decision.get("gates", [])]
    paused = row.state == RolloutState.PAUSED.value
    in_shadow = spec.shadow is not None and status.shadow_done < status.stage_index
    return {
        **summary(row),
        "spec": spec.to_json(),
        "stage_started_at": _time(status.stage_started_at),
        "paused_reason": status.reason if paused else None,
        "held_devices": sorted(status.held_devices),
        "paused_gates": [{**g, "text": gate_text(g)} for g in status.paused_gates]
        if paused
        else [],
        # The current stage is shadowing the candidate (no device installs yet).
        "shadow_phase": in_shadow and row.state != RolloutState.COMPLETED.value,
        "shadowing": decision.get("shadowing", 0),
        "acknowledged_devices": len(status.acknowledged),
        "stage_list": stages,
        "gates": gates,
        "tripped": [g for g in gates if g.get("tripped")],
        "waiting": list(decision.get("waiting", [])),
        "decision": {
            key: decision.get(key)
            for key in ("kind", "reason", "at", "started", "window_open", "tick_ms")
        }
        if decision
        else None,
    }


def history(rows: list[RolloutHistory]) -> list[dict[str, Any]]:
    return [
        {
            "id": h.id,
            "time": _time(h.time),
            "actor": h.actor,
            "trigger": h.trigger,
            "from_state": h.from_state,
            "to_state": h.to_state,
            "from_stage": h.from_stage,
            "to_stage": h.to_stage,
            "devices": h.devices,
            "reason": h.reason,
            "process": h.process,
        }
        for h in rows
    ]


def devices(
    s: Session, row: Rollout, *, stage: int | None, status: str | None, limit: int, offset: int
) -> list[dict[str, Any]]:
    """One page of the rollout's devices in cohort order, with their measurements."""
    rd = RolloutDevice
    query = select(rd).where(rd.rollout_id == row.id)
    if stage is not None:
        query = query.where(rd.stage == stage)
    if status is not None:
        query = query.where(rd.status == status)
    members = list(s.scalars(query.order_by(rd.rank).limit(limit).offset(offset)))
    match = ReleaseMatch(row.name, row.release)
    # The same figures the gates judge: enough windows, sensor power unless estimates are gated.
    measured = measurements.current(
        s, row.id, match, [m.device_id for m in members],
        min_windows=DEFAULT_CONFIG.min_gate_windows,
        sensor_only=not spec_of(row).gates_estimates,
    )  # fmt: skip
    out = []
    for m in members:
        now = measured.get(m.device_id)
        previous = (
            f"{m.previous_name}@{m.previous_release}" if m.previous_name is not None else None
        )
        out.append(
            {
                "device_id": m.device_id,
                "stage": m.stage,
                "rank": m.rank,
                "status": m.status,
                "reason": m.reason,
                "started_at": _time(m.started_at),
                "reverted_at": _time(m.reverted_at),
                "previous": previous,
                "previous_variant": m.previous_variant,
                "baseline_p95_ms": m.baseline_p95_ms,
                "baseline_power_mw": m.baseline_power_mw,
                "p95_ms": now.p95_ms if now else None,
                "power_mw": now.power_mw if now else None,
                "errors": now.errors if now else 0,
                "golden_accuracy": m.golden_accuracy,
            }
        )
    return out


def list_rows(s: Session, *, state: str | None, limit: int, offset: int) -> list[Rollout]:
    query = select(Rollout)
    if state is not None:
        query = query.where(Rollout.state == state)
    return list(s.scalars(query.order_by(Rollout.created_at.desc()).limit(limit).offset(offset)))

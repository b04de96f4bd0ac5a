"""One rollout's stored facts for the policy: fold new reports in, then build ``DeviceFacts``.

Each tick reads the rollout's devices (joined with their inventory rows), the
events after the rollout's cursor, the check-ins and the telemetry rollups;
folds them into each device's status (``signals``), writes back the rows that
changed and moves the cursor past events old enough to be settled.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from server.db import Device, Event, as_utc
from server.rollout.spec import RolloutSpec
from server.rollout.states import DeviceFacts, InstallStatus
from server.rollout_service import telemetry
from server.rollout_service.config import ServiceConfig
from server.rollout_service.signals import (
    EVENT_TYPES,
    Progress,
    ReleaseMatch,
    fold_checkin,
    fold_event,
    report_of,
)
from server.rollout_service.tables import Rollout, RolloutDevice


@dataclass(slots=True)
class _Device:
    device_id: str
    stage: int
    rank: int
    started_at: datetime | None
    profile: str
    last_seen: datetime | None
    installed: tuple[str | None, int | None]
    baseline_p95_ms: float | None
    baseline_power_mw: float | None
    stored: Progress
    progress: Progress


def _load(s: Session, rollout_id: str) -> dict[str, _Device]:
    rd = RolloutDevice
    query = (
        select(
            rd.device_id,
            rd.stage,
            rd.rank,
            rd.status,
            rd.reason,
            rd.golden_accuracy,
            rd.last_event_id,
            rd.started_at,
            rd.baseline_p95_ms,
            rd.baseline_power_mw,
            Device.profile,
            Device.last_seen,
            Device.installed_name,
            Device.installed_release,
        )
        .join(Device, Device.id == rd.device_id)
        .where(rd.rollout_id == rollout_id)
    )
    devices: dict[str, _Device] = {}
    for (
        device_id,
        stage,
        rank,
        status,
        reason,
        golden,
        last_event,
        started,
        base_p95,
        base_power,
        profile,
        seen,
        name,
        release,
    ) in s.execute(query):
        progress = Progress(InstallStatus(status), reason, golden, last_event)
        devices[device_id] = _Device(
            device_id,
            stage,
            rank,
            as_utc(started),
            profile,
            as_utc(seen),
            (name, release),
            base_p95,
            base_power,
            progress,
            progress,
        )
    return devices


def _fold_events(
    s: Session, row: Rollout, devices: dict[str, _Device], match: ReleaseMatch
) -> None:
    rd = RolloutDevice
    query = (
        select(Event.id, Event.device_id, Event.type, Event.state, Event.source, Event.detail)
        .join(rd, and_(rd.device_id == Event.device_id, rd.rollout_id == row.id))
        .where(
            Event.id > row.event_cursor,
            Event.type.in_(EVENT_TYPES),
            rd.started_at.is_not(None),
        )
        .order_by(Event.id)
    )
    for event_id, device_id, type_, state, source, detail in s.execute(query):
        device = devices.get(device_id)
        if device is not None:
            device.progress = fold_event(
                device.progress, event_id, type_, state, report_of(detail, source), match=match
            )


def _write_back(s: Session, rollout_id: str, devices: dict[str, _Device]) -> int:
    changed = [
        {
            "rollout_id": rollout_id,
            "device_id": d.device_id,
            "status": d.progress.status.value,
            "reason": d.progress.reason,
            "golden_accuracy": d.progress.golden_accuracy,
            "last_event_id": d.progress.last_event_id,
        }
        for d in devices.values()
        if d.progress != d.stored
    ]
    if changed:
        s.execute(update(RolloutDevice), changed)
    return len(changed)


def settled_cursor(s: Session, cursor: int, settled_before: datetime) -> int:
    """The newest event id old enough that no lower id can still be uncommitted."""
    newest = s.scalar(
        select(func.max(Event.id)).where(Event.id > cursor, Event.time < settled_before)
    )
    return int(newest) if newest is not None else cursor


def collect(
    s: Session, row: Rollout, spec: RolloutSpec, cfg: ServiceConfig, wall_now: datetime
) -> list[DeviceFacts]:
    """Fold the newest reports into ``rollout_devices`` and return every device's facts."""
    match = ReleaseMatch.of(spec.release)
    devices = _load(s, row.id)
    _fold_events(s, row, devices, match)
    for d in devices.values():
        if d.started_at is not None:
            d.progress = fold_checkin(d.progress, *d.installed, match)
    _write_back(s, row.id, devices)
    cursor = settled_cursor(s, row.event_cursor, wall_now - cfg.event_settle)
    if cursor != row.event_cursor:
        row.event_cursor = cursor
    measured = telemetry.current(s, row.id, match)
    facts: list[DeviceFacts] = []
    none = telemetry.Measured(None, None, 0)
    for d in devices.values():
        m = measured.get(d.device_id, none)
        facts.append(
            DeviceFacts(
                device_id=d.device_id,
                profile=d.profile,
                stage=d.stage,
                rank=d.rank,
                status=d.progress.status,
                started_at=d.started_at,
                last_seen=d.last_seen,
                baseline_p95_ms=d.baseline_p95_ms,
                p95_ms=m.p95_ms,
                baseline_power_mw=d.baseline_power_mw,
                power_mw=m.power_mw,
                golden_accuracy=d.progress.golden_accuracy,
                error_count=m.errors,
            )
        )
    return facts

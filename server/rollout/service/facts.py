"""One rollout's facts for the policy: fold new reports in, then build ``DeviceFacts``.

A tick starts from the rollout's ``Snapshot`` (``snapshot``): kept in memory
by the process since its previous tick, or loaded from ``rollout_devices``
joined with the inventory when there is none or it is stale. It then reads
what is new (events, check-ins, telemetry rollups), folds it into each
touched device's status (``signals``), writes back the rows whose status
changed, rebuilds only the touched devices' facts and moves the stored event
cursor past events old enough to be settled (where a rebuild starts from).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from server.db.tables import Device, Event, as_utc
from server.rollout.core.spec import RolloutSpec
from server.rollout.core.states import DeviceFacts, InstallStatus
from server.rollout.service import measurements
from server.rollout.service.settings import ServiceConfig
from server.rollout.service.signals import (
    EVENT_TYPES,
    Progress,
    ReleaseMatch,
    fold_checkin,
    fold_event,
    report_of,
)
from server.rollout.service.snapshot import Snapshot, TrackedDevice, read_checkins, read_events
from server.rollout.service.tables import Rollout, RolloutDevice

_STATUS = {status.value: status for status in InstallStatus}
_NOT_MEASURED = measurements.Measured(None, None, 0)


def _load(s: Session, rollout_id: str) -> dict[str, TrackedDevice]:
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
    devices: dict[str, TrackedDevice] = {}
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
    ) in s.connection().execute(query):
        progress = Progress(_STATUS[status], reason, golden, last_event)
        devices[device_id] = TrackedDevice(
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


def load(s: Session, row: Rollout, wall_now: datetime) -> Snapshot:
    """A snapshot from the tables; events after the stored cursor are read again."""
    devices = _load(s, row.id)
    return Snapshot(row.id, devices, row.event_cursor, wall_now, dirty=set(devices))


def _fold_events(snap: Snapshot, cfg: ServiceConfig, s: Session, match: ReleaseMatch) -> None:
    devices, dirty = snap.devices, snap.dirty
    for e in read_events(s, snap, cfg.event_settle):
        if e.type not in EVENT_TYPES:
            continue
        d = devices.get(e.device_id)
        if d is None or d.started_at is None:
            continue
        folded = fold_event(
            d.progress, e.id, e.type, e.state, report_of(e.detail, e.source), match=match
        )
        if folded != d.progress:
            d.progress = folded
            dirty.add(d.device_id)


def _fold_checkins(snap: Snapshot, cfg: ServiceConfig, s: Session, wall_now: datetime) -> None:
    devices, dirty = snap.devices, snap.dirty
    for device_id, seen, name, release in read_checkins(s, snap, wall_now, cfg.checkin_settle):
        d = devices.get(device_id)
        if d is not None and (d.last_seen != seen or d.installed != (name, release)):
            d.last_seen, d.installed = seen, (name, release)
            dirty.add(device_id)


def _write_back(s: Session, rollout_id: str, devices: list[TrackedDevice]) -> int:
    changed = [d for d in devices if d.progress != d.stored]
    if changed:
        s.execute(
            update(RolloutDevice),
            [
                {
                    "rollout_id": rollout_id,
                    "device_id": d.device_id,
                    "status": d.progress.status.value,
                    "reason": d.progress.reason,
                    "golden_accuracy": d.progress.golden_accuracy,
                    "last_event_id": d.progress.last_event_id,
                }
                for d in changed
            ],
        )
        for d in changed:
            d.stored = d.progress
    return len(changed)


def settled_cursor(s: Session, cursor: int, settled_before: datetime) -> int:
    """The newest event id old enough that no lower id can still be uncommitted."""
    newest = s.scalar(
        select(func.max(Event.id)).where(Event.id > cursor, Event.time < settled_before)
    )
    return int(newest) if newest is not None else cursor


def _facts(d: TrackedDevice, m: measurements.Measured) -> DeviceFacts:
    return DeviceFacts(
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


def collect(
    s: Session,
    row: Rollout,
    spec: RolloutSpec,
    cfg: ServiceConfig,
    wall_now: datetime,
    *,
    snap: Snapshot | None = None,
) -> tuple[list[DeviceFacts], Snapshot]:
    """Fold what is new into ``snap`` (loaded when None) and ``rollout_devices``; return
    every device's facts and the snapshot to keep for the next tick."""
    match = ReleaseMatch.of(spec.release)
    if snap is None:
        snap = load(s, row, wall_now)
    _fold_events(snap, cfg, s, match)
    _fold_checkins(snap, cfg, s, wall_now)
    devices = snap.devices
    touched = [devices[d] for d in snap.dirty if d in devices]
    for d in touched:
        if d.started_at is not None:
            d.progress = fold_checkin(d.progress, *d.installed, match)
    _write_back(s, row.id, touched)
    # The stored cursor only bounds what a rebuild reads again, and finding it scans
    # every event after it: done now and then, not every tick.
    if snap.cursor_at is None or wall_now - snap.cursor_at >= cfg.cursor_interval:
        snap.cursor_at = wall_now
        cursor = settled_cursor(s, row.event_cursor, wall_now - cfg.event_settle)
        if cursor != row.event_cursor:
            row.event_cursor = cursor
    measured = measurements.current(
        s, row.id, match, min_windows=cfg.min_gate_windows, sensor_only=not spec.gates_estimates
    )
    previous = snap.measured
    for device_id in previous.keys() | measured.keys():
        if previous.get(device_id) != measured.get(device_id) and device_id in devices:
            touched.append(devices[device_id])
    snap.measured = measured
    for d in touched:
        snap.put(d, _facts(d, measured.get(d.device_id, _NOT_MEASURED)))
    snap.dirty.clear()
    return snap.all_facts(), snap


def note_started(snap: Snapshot, rows: list[dict[str, object]], now: datetime) -> None:
    """Mirror ``engine.start_devices``'s writes: the devices it told to install."""
    for values in rows:
        d = snap.devices.get(str(values["device_id"]))
        if d is None:
            continue
        d.started_at = now
        base_p95, base_power = values["baseline_p95_ms"], values["baseline_power_mw"]
        d.baseline_p95_ms = float(base_p95) if isinstance(base_p95, int | float) else None
        d.baseline_power_mw = float(base_power) if isinstance(base_power, int | float) else None
        d.progress = d.stored = d.stored._replace(status=InstallStatus.PENDING)
        snap.put(d, _facts(d, snap.measured.get(d.device_id, _NOT_MEASURED)))
        snap.dirty.add(d.device_id)  # a check-in may already name the release

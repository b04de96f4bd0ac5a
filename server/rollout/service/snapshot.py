"""A rollout's device facts kept in memory between ticks, refreshed from what changed.

A tick used to read every device of the rollout (65,000 rows joined with the
inventory) and rebuild every ``DeviceFacts``. The process that ticks a rollout
now keeps that state and reads only what is new since its last tick:

- events by id: every id above the highest seen, plus the *gaps* below it. On
  PostgreSQL an id is taken at insert and becomes visible at commit, so a lower
  id may appear after a higher one; a missing id is asked for again each tick
  until it shows up or is older than ``event_settle`` (a rolled-back insert);
- check-ins by ``devices.last_seen`` since the previous read, less a margin for
  check-ins that were in flight at that moment (``checkin_settle``).

The snapshot is valid only while nobody else wrote the rollout: the rollout
row's ``version`` is bumped by every tick and every operator action, so a
snapshot whose version differs from the row's (another replica ticked, an
operator reverted) is dropped and rebuilt from the tables.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from server.db.tables import Device, Event, as_utc
from server.rollout.core.states import DeviceFacts
from server.rollout.service.measurements import Measured
from server.rollout.service.signals import Progress

_MAX_GAPS = 50_000  # beyond this the oldest gaps are given up (a burst of rollbacks)
_MAX_SNAPSHOTS = 32  # rollouts kept in memory per database


@dataclass(slots=True)
class TrackedDevice:
    """One device of the rollout as the tick sees it; ``stored`` is its row's status."""

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
    facts: DeviceFacts | None = None


@dataclass
class Snapshot:
    rollout_id: str
    devices: dict[str, TrackedDevice]
    max_event_id: int  # every event id up to here was read, but for ``gaps``
    seen_until: datetime  # check-ins were read up to this wall time
    version: int = 0  # the rollout row's version after the tick that left this
    gaps: dict[int, float] = field(default_factory=dict)  # missing id -> monotonic time noticed
    measured: dict[str, Measured] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)  # devices whose facts must be rebuilt
    cursor_at: datetime | None = None  # when the stored event cursor was last moved on
    listed: list[DeviceFacts] = field(default_factory=list)  # every device's facts, in place
    slots: dict[str, int] = field(default_factory=dict)  # device id -> index in ``listed``

    def put(self, d: TrackedDevice, facts: DeviceFacts) -> None:
        """Set one device's facts (the list handed to the policy is updated in place)."""
        d.facts = facts
        slot = self.slots.get(d.device_id)
        if slot is not None:
            self.listed[slot] = facts

    def all_facts(self) -> list[DeviceFacts]:
        if len(self.listed) != len(self.devices):
            self.listed = [d.facts for d in self.devices.values() if d.facts is not None]
            self.slots = {f.device_id: i for i, f in enumerate(self.listed)}
        return self.listed


@dataclass(frozen=True)
class EventRow:
    id: int
    device_id: str
    type: str
    state: str | None
    source: str
    detail: Any


def read_events(s: Session, snap: Snapshot, settle: timedelta) -> list[EventRow]:
    """Events not read before, in id order; the snapshot's id bookkeeping moves on."""
    since = snap.max_event_id
    gaps = list(snap.gaps)
    where = Event.id > since
    if gaps:
        where = or_(where, Event.id.in_(gaps[:1000]))
    query = select(
        Event.id, Event.device_id, Event.type, Event.state, Event.source, Event.detail
    ).where(where)
    # On the session's connection: plain rows, without the ORM's per-statement machinery.
    rows = [EventRow(*r) for r in s.connection().execute(query.order_by(Event.id))]
    now = time.monotonic()
    for row in rows:
        snap.gaps.pop(row.id, None)
    expected = since + 1
    for row in rows:
        if row.id <= since:
            continue
        for missing in range(expected, row.id):
            snap.gaps[missing] = now
        expected = row.id + 1
    if rows:
        snap.max_event_id = max(since, rows[-1].id)
    _expire_gaps(snap, now - settle.total_seconds())
    return rows


def _expire_gaps(snap: Snapshot, before: float) -> None:
    stale = [gap for gap, noticed in snap.gaps.items() if noticed < before]
    for gap in stale:
        del snap.gaps[gap]
    if len(snap.gaps) > _MAX_GAPS:
        for gap in sorted(snap.gaps)[: len(snap.gaps) - _MAX_GAPS]:
            del snap.gaps[gap]


def read_checkins(
    s: Session, snap: Snapshot, wall_now: datetime, settle: timedelta
) -> list[tuple[str, datetime | None, str | None, int | None]]:
    """Devices of the rollout that checked in since the last read (less ``settle``).

    Only the ``last_seen`` index is asked, and the rollout's devices are picked out
    here: a join lets the planner walk all of the rollout's rows when its statistics
    are stale, as they are right after a rollout of 65,000 devices is created.
    """
    query = select(
        Device.id, Device.last_seen, Device.installed_name, Device.installed_release
    ).where(Device.last_seen >= snap.seen_until - settle)
    mine, conn = snap.devices, s.connection()
    postgres = conn.dialect.name == "postgresql"
    if postgres:  # the newest second of check-ins is beyond any histogram: use the index
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    rows = [
        (device_id, as_utc(seen), name, release)
        for device_id, seen, name, release in conn.execute(query)
        if device_id in mine
    ]
    if postgres:
        conn.exec_driver_sql("SET LOCAL enable_seqscan = on")
    snap.seen_until = wall_now
    return rows


class SnapshotCache:
    """Snapshots by (database, rollout); a tick takes one out and gives it back on success,
    so a tick that fails leaves nothing half-applied behind."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshots: dict[tuple[str, str], Snapshot] = {}

    def take(self, db_url: str, rollout_id: str, version: int) -> Snapshot | None:
        with self._lock:
            snap = self._snapshots.pop((db_url, rollout_id), None)
        return snap if snap is not None and snap.version == version else None

    def give_back(self, db_url: str, snap: Snapshot) -> None:
        with self._lock:
            mine = [key for key in self._snapshots if key[0] == db_url]
            if len(mine) >= _MAX_SNAPSHOTS:
                del self._snapshots[mine[0]]
            self._snapshots[(db_url, snap.rollout_id)] = snap

    def drop(self, db_url: str, rollout_id: str) -> None:
        with self._lock:
            self._snapshots.pop((db_url, rollout_id), None)


CACHE = SnapshotCache()

"""SQL of telemetry ingest: one batch per transaction, rollup queries and retention.

``write_batch`` stores a batch of MQTT messages inside the caller's
transaction: the newest payload per device and channel, ``last_seen``,
events, the QoS 1 dedupe cursors and the rollup rows. Every agent message
carries its outbox ``seq``; a per-device cursor (``ingest_cursors``) drops
anything at or before the newest accepted one (``windows.is_repeat``).
The cursor rows are locked in device order (``FOR UPDATE`` on PostgreSQL;
SQLite has one writer), which also serialises the read-merge-upsert of that
device's rollup rows when several server replicas ingest the same stream.
The upsert (``ON CONFLICT``) is the same statement on both databases.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, bindparam, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from server.config import ServerConfig
from server.db import queries
from server.db.tables import (
    Database,
    Device,
    IngestCursor,
    TelemetryLatest,
    TelemetryRollup,
    as_utc,
    utcnow,
)
from server.telemetry.windows import (
    Cursor,
    RollupKey,
    RollupValues,
    bucket_start,
    count,
    is_repeat,
    message_position,
    power_source_of,
    release_of,
    window_time,
)

KEY_COLUMNS = ("bucket", "device_id", "profile", "model", "release", "power_source")


@dataclass(frozen=True)
class RollupConfig:
    bucket_s: int = 60
    retention_s: float = 30 * 86_400.0
    flush_interval_s: float = 0.2
    flush_idle_s: float = 0.005  # a pause this long in the stream also ends a batch
    flush_max_messages: int = 500
    queue_max: int = 20_000
    prune_interval_s: float = 3600.0
    max_clock_skew_s: float = 300.0
    retry_backoff_s: float = 1.0

    @classmethod
    def from_server(cls, cfg: ServerConfig) -> RollupConfig:
        return cls(
            bucket_s=cfg.rollup_bucket_s,
            retention_s=cfg.telemetry_retention_days * 86_400.0,
            flush_interval_s=cfg.rollup_flush_interval_s,
            # The idle gap only matters when the broker waits for our commit to send more;
            # otherwise sparse windows are written together, not one transaction each.
            flush_idle_s=(
                cfg.rollup_flush_idle_s
                if cfg.ingest_ack_after_commit
                else cfg.rollup_flush_interval_s
            ),
            flush_max_messages=cfg.rollup_flush_max_messages,
            queue_max=cfg.ingest_queue_max,
            prune_interval_s=cfg.retention_prune_interval_s,
            max_clock_skew_s=cfg.max_clock_skew_s,
        )


@dataclass(frozen=True)
class IngestMessage:
    """One decoded MQTT message; ``ack`` is called once it is committed (or refused)."""

    device_id: str
    channel: str
    payload: dict[str, Any]
    received_at: datetime
    ack: Callable[[], None] | None = None


@dataclass(frozen=True)
class BatchResult:
    accepted: list[IngestMessage]
    duplicates: int
    rejected: int
    windows: int
    outbox_dropped: int


def _insert(s: Session) -> Any:
    return postgresql.insert if s.get_bind().dialect.name == "postgresql" else sqlite.insert


def _table(model: Any) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


@functools.lru_cache(maxsize=32)
def _upsert_statement(
    dialect: str, table: Table, keys: tuple[str, ...], updates: tuple[str, ...]
) -> Any:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(table)
    return stmt.on_conflict_do_update(
        index_elements=list(keys), set_={c: stmt.excluded[c] for c in updates}
    )


def _upsert(s: Session, table: Table, rows: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    """``INSERT ... ON CONFLICT (keys) DO UPDATE`` of every other column, as one executemany.

    One cached statement for all rows keeps SQLAlchemy's compiled cache warm;
    a multi-row VALUES clause would be compiled again for every batch.
    """
    if not rows:
        return
    updates = tuple(c for c in rows[0] if c not in keys)
    s.execute(_upsert_statement(s.get_bind().dialect.name, table, keys, updates), rows)


def _lock_cursors(s: Session, device_ids: Sequence[str], now: datetime) -> dict[str, Cursor]:
    """The cursors of ``device_ids``, created if missing, their rows locked in id order."""
    table = _table(IngestCursor)
    query = select(table.c.device_id, table.c.seq, table.c.ts).order_by(table.c.device_id)
    query = query.with_for_update()
    rows = {
        r.device_id: Cursor(r.seq, r.ts)
        for r in s.execute(query.where(table.c.device_id.in_(device_ids)))
    }
    missing = [d for d in device_ids if d not in rows]
    if missing:
        values = [{"device_id": d, "seq": None, "ts": None, "updated_at": now} for d in missing]
        s.execute(_insert(s)(table).on_conflict_do_nothing(), values)
        again = s.execute(query.where(table.c.device_id.in_(missing)))
        rows.update({r.device_id: Cursor(r.seq, r.ts) for r in again})
    return rows


def _save_cursors(s: Session, cursors: dict[str, Cursor], now: datetime) -> None:
    table = _table(IngestCursor)
    stmt = (
        update(table)
        .where(table.c.device_id == bindparam("b_device"))
        .values(seq=bindparam("b_seq"), ts=bindparam("b_ts"), updated_at=now)
    )
    rows = [{"b_device": d, "b_seq": c.seq, "b_ts": c.ts} for d, c in cursors.items()]
    if rows:
        s.execute(stmt, rows)


def _touch_devices(s: Session, seen: dict[str, datetime]) -> None:
    table = _table(Device)
    stmt = (
        update(table).where(table.c.id == bindparam("b_id")).values(last_seen=bindparam("b_seen"))
    )
    if seen:
        s.execute(stmt, [{"b_id": d, "b_seen": t} for d, t in seen.items()])


def _write_latest(s: Session, messages: Iterable[IngestMessage]) -> None:
    rows = [
        {
            "device_id": m.device_id,
            "channel": m.channel,
            "received_at": m.received_at,
            "payload": m.payload,
        }
        for m in messages
    ]
    _upsert(s, _table(TelemetryLatest), rows, ("device_id", "channel"))


def _write_rollups(s: Session, deltas: dict[RollupKey, RollupValues], now: datetime) -> None:
    """Merge ``deltas`` into the stored rows (read, add, upsert)."""
    if not deltas:
        return
    table = _table(TelemetryRollup)
    devices = sorted({k.device_id for k in deltas})
    buckets = sorted({k.bucket for k in deltas})
    existing = s.execute(
        select(table).where(table.c.device_id.in_(devices), table.c.bucket.in_(buckets))
    )
    for row in existing:
        key = RollupKey(
            as_utc(row.bucket) or row.bucket,
            row.device_id,
            row.profile,
            row.model,
            row.release,
            row.power_source,
        )
        if key in deltas:
            deltas[key] = RollupValues.from_row(row).merge(deltas[key])
    rows = [
        {**{c: getattr(k, c) for c in KEY_COLUMNS}, **v.to_columns(), "updated_at": now}
        for k, v in deltas.items()
    ]
    _upsert(s, table, rows, KEY_COLUMNS)


def write_batch(s: Session, batch: Sequence[IngestMessage], cfg: RollupConfig) -> BatchResult:
    """Store one batch inside the caller's transaction (pure SQL work, no threads)."""
    now = utcnow()
    ids = sorted({m.device_id for m in batch})
    profiles: dict[str, str] = {
        row.id: row.profile
        for row in s.execute(select(Device.id, Device.profile).where(Device.id.in_(ids)))
    }
    stored = _lock_cursors(s, sorted(profiles), now) if profiles else {}
    cursors = dict(stored)
    accepted: list[IngestMessage] = []
    duplicates = rejected = 0
    for m in batch:
        if m.device_id not in profiles:
            rejected += 1
            continue
        seq, ts = message_position(m.payload)
        if seq is not None:
            if is_repeat(seq, ts, cursors[m.device_id]):
                duplicates += 1
                continue
            cursors[m.device_id] = Cursor(seq, ts)
        accepted.append(m)

    latest: dict[tuple[str, str], IngestMessage] = {}
    deltas: dict[RollupKey, RollupValues] = {}
    seen: dict[str, datetime] = {}
    windows = dropped = 0
    for m in accepted:
        seen[m.device_id] = max(m.received_at, seen.get(m.device_id, m.received_at))
        lost = count(m.payload.get("outbox_dropped"))
        if lost:
            dropped += lost
            queries.add_event(
                s, m.device_id, "outbox_dropped", detail={"dropped": lost}, source="mqtt"
            )
        if m.channel == "events":
            queries.store_telemetry(s, m.device_id, m.channel, m.payload, now=m.received_at)
            continue
        latest[(m.device_id, m.channel)] = m
        if m.channel == "telemetry":
            windows += 1
            when = window_time(m.payload, m.received_at, cfg.retention_s, cfg.max_clock_skew_s)
            model, release = release_of(m.payload)
            key = RollupKey(
                bucket_start(when, cfg.bucket_s),
                m.device_id,
                profiles[m.device_id],
                model,
                release,
                power_source_of(m.payload),
            )
            deltas.setdefault(key, RollupValues()).add_window(m.payload)

    _write_latest(s, latest.values())
    _touch_devices(s, seen)
    _write_rollups(s, deltas, now)
    _save_cursors(s, {d: c for d, c in cursors.items() if c != stored.get(d)}, now)
    return BatchResult(accepted, duplicates, rejected, windows, dropped)


def prune(db: Database, retention_s: float, now: datetime | None = None) -> int:
    """Delete rollups older than the retention; returns the number of rows removed."""
    cutoff = (now or utcnow()) - timedelta(seconds=retention_s)
    with db.session() as s:
        result = s.execute(delete(TelemetryRollup).where(TelemetryRollup.bucket < cutoff))
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass(frozen=True)
class RollupQuery:
    """Buckets starting in ``[since, until)``, optionally for one device, profile or release."""

    since: datetime
    until: datetime
    device_id: str | None = None
    profile: str | None = None
    model: str | None = None
    release: int | None = None
    limit: int = 1000


def query_rollups(s: Session, q: RollupQuery) -> tuple[list[Any], bool]:
    """Matching rollup rows in time order, and whether ``limit`` cut the list short."""
    table = _table(TelemetryRollup)
    stmt = select(table).where(table.c.bucket >= q.since, table.c.bucket < q.until)
    for column, value in (
        (table.c.device_id, q.device_id),
        (table.c.profile, q.profile),
        (table.c.model, q.model),
        (table.c.release, q.release),
    ):
        if value is not None:
            stmt = stmt.where(column == value)
    stmt = stmt.order_by(*(table.c[c] for c in KEY_COLUMNS)).limit(q.limit + 1)
    rows = list(s.execute(stmt))
    return rows[: q.limit], len(rows) > q.limit

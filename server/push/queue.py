"""The ``push_requests`` table: who should be told to check in now, and why.

Writers (the rollout engine, revert, operator assignments) call ``request`` or
``request_tag`` inside the transaction that changes a device's desired target
or shadow, so a push exists exactly when the change commits. The pacer
(``server.push.pacer``) takes the oldest rows with ``claim``, publishes, and
deletes what it sent with ``remove``.

A request is an upsert that refreshes ``requested_at``; ``remove`` deletes a
row only if ``requested_at`` is still the one claimed. So a change that lands
while the pacer is sending for the same device leaves a fresh row behind, and
the device is told again rather than left on a stale answer until its next
poll. On PostgreSQL ``claim`` locks rows with ``FOR UPDATE SKIP LOCKED``: two
pacers never send the same request, and an upsert waits for the claim's commit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, bindparam, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from server.db.tables import DeviceTag, PushRequest, utcnow
from server.errors import InvalidInputError

REASONS = frozenset({"desired", "shadow", "revert", "operator"})
_CHUNK = 500  # rows per statement: well under SQLite's bound-parameter limit

_table = PushRequest.__table__
assert isinstance(_table, Table)
PUSH_REQUESTS: Table = _table
_C = PUSH_REQUESTS.c

_OLDEST = select(_C.device_id, _C.reason, _C.requested_at).order_by(_C.requested_at, _C.device_id)
_REMOVE = delete(PUSH_REQUESTS).where(
    _C.device_id == bindparam("d"), _C.requested_at == bindparam("t")
)
_DEPTH = select(func.count()).select_from(PUSH_REQUESTS)


@dataclass(frozen=True)
class Claimed:
    """One request the pacer took: publish, then ``remove``."""

    device_id: str
    reason: str
    requested_at: datetime

    def command(self) -> dict[str, str]:
        """The ``cmd`` payload the device (and the fleet simulator) acts on."""
        return {"action": "checkin", "reason": self.reason}


def _dialect(conn: Session | Connection) -> str:
    if isinstance(conn, Session):
        return conn.get_bind().dialect.name
    return conn.dialect.name


def _upsert(dialect: str, rows: list[dict[str, Any]]) -> Any:
    make = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = make(PUSH_REQUESTS).values(rows)
    return stmt.on_conflict_do_update(
        index_elements=["device_id"],
        set_={"reason": stmt.excluded.reason, "requested_at": stmt.excluded.requested_at},
    )


def request(
    conn: Session | Connection,
    device_ids: Iterable[str],
    reason: str,
    now: datetime | None = None,
) -> int:
    """Ask for a push to each device (once per device); the number of devices asked."""
    if reason not in REASONS:
        raise InvalidInputError(f"push reason {reason!r} is not one of {sorted(REASONS)}")
    # Sorted: concurrent writers lock rows in one order, so they cannot deadlock.
    ids = sorted(set(device_ids))
    at = now or utcnow()
    dialect = _dialect(conn)
    for start in range(0, len(ids), _CHUNK):
        rows = [
            {"device_id": d, "reason": reason, "requested_at": at}
            for d in ids[start : start + _CHUNK]
        ]
        conn.execute(_upsert(dialect, rows))
    return len(ids)


def request_tag(
    conn: Session | Connection, key: str, value: str, reason: str, now: datetime | None = None
) -> int:
    """Ask for a push to every device tagged ``key=value`` now (expanded at insert time)."""
    query = select(DeviceTag.device_id).where(DeviceTag.key == key, DeviceTag.value == value)
    return request(conn, list(conn.scalars(query)), reason, now)


def claim(conn: Connection, limit: int) -> list[Claimed]:
    """The ``limit`` oldest requests; on PostgreSQL locked until ``conn``'s transaction ends
    and skipped by any other pacer meanwhile."""
    query = _OLDEST.limit(limit)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return [Claimed(d, r, t) for d, r, t in conn.execute(query)]


def remove(conn: Connection, sent: Sequence[Claimed]) -> None:
    """Delete the requests that were sent, unless a newer request replaced one meanwhile."""
    if sent:
        conn.execute(_REMOVE, [{"d": c.device_id, "t": c.requested_at} for c in sent])


def depth(conn: Connection) -> int:
    """Requests waiting (across every replica)."""
    return int(conn.scalar(_DEPTH) or 0)

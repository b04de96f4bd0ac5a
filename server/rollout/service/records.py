"""Rollout rows: locking, loading, status changes with history, overlap lookups.

Locking: on PostgreSQL the rollout's row is locked with ``SELECT ... FOR UPDATE``
(``SKIP LOCKED`` for the scheduler, so a replica never waits for another's
tick) for the whole transaction, and starts also take one transaction-scoped
advisory lock, so two replicas cannot start overlapping rollouts at once. On
SQLite (one server process) a process-wide lock per database does the same.
The row's ``version`` column is SQLAlchemy's version counter besides: a write
based on a stale read fails instead of overwriting (compare-and-set).
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db.tables import Database
from server.errors import NotFoundError
from server.rollout.core.spec import RolloutSpec
from server.rollout.core.states import RolloutState, RolloutStatus
from server.rollout.service import shadow_store
from server.rollout.service.settings import ServiceConfig
from server.rollout.service.tables import Rollout, RolloutDevice, RolloutHistory

# States in which a rollout holds its devices: no other rollout may take them.
HOLDING = (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.AWAITING_APPROVAL)
# States the scheduler ticks (a paused rollout keeps its progress and gates current).
TICKED = HOLDING
PROCESS = f"{socket.gethostname()}:{os.getpid()}"[:128]

_local_locks: dict[str, threading.RLock] = {}
_local_guard = threading.Lock()


def new_rollout_id() -> str:
    return f"ro-{secrets.token_hex(6)}"


def _local_lock(db: Database) -> threading.RLock | None:
    """The process-wide lock standing in for row locks on SQLite (None on PostgreSQL)."""
    if db.dialect != "sqlite":
        return None
    with _local_guard:
        return _local_locks.setdefault(db.url, threading.RLock())


@contextmanager
def locked_rollout(
    db: Database, rollout_id: str, *, wait: bool
) -> Iterator[tuple[Session, Rollout] | None]:
    """A transaction holding the rollout's lock; None when busy (``wait=False``) or gone."""
    lock = _local_lock(db)
    if lock is not None and not lock.acquire(blocking=wait):
        yield None
        return
    try:
        with db.session() as s:
            query = select(Rollout).where(Rollout.id == rollout_id)
            row = s.scalars(query.with_for_update(skip_locked=not wait)).one_or_none()
            if row is None:
                if wait:
                    raise NotFoundError(f"no rollout {rollout_id!r}")
                yield None
                return
            yield s, row
    finally:
        if lock is not None:
            lock.release()


@contextmanager
def start_guard(db: Database) -> Iterator[None]:
    """Serialise rollout starts within this process (SQLite); see ``lock_starts`` for PG."""
    lock = _local_lock(db)
    if lock is None:
        yield
        return
    with lock:
        yield


def lock_starts(s: Session, cfg: ServiceConfig) -> None:
    """On PostgreSQL: wait for other replicas' starts until this transaction ends."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(select(func.pg_advisory_xact_lock(cfg.start_lock_key)))


def get_rollout(s: Session, rollout_id: str) -> Rollout:
    row = s.get(Rollout, rollout_id)
    if row is None:
        raise NotFoundError(f"no rollout {rollout_id!r}")
    return row


def spec_of(row: Rollout) -> RolloutSpec:
    return RolloutSpec.from_json(row.spec)


def status_of(row: Rollout) -> RolloutStatus:
    return RolloutStatus.from_json(row.status)


def ticked_ids(s: Session) -> list[str]:
    query = select(Rollout.id).where(Rollout.state.in_([st.value for st in TICKED]))
    return list(s.scalars(query.order_by(Rollout.created_at)))


def set_status(
    s: Session,
    row: Rollout,
    new: RolloutStatus,
    now: datetime,
    *,
    actor: str,
    trigger: str,
    devices: int = 0,
    cfg: ServiceConfig,
) -> None:
    """Store ``new`` (flushed with the version check) and record the change."""
    old_state, old_stage = row.state, row.stage_index
    row.status = new.to_json()
    row.state = new.state.value
    row.stage_index = new.stage_index
    row.updated_at = now
    s.add(
        RolloutHistory(
            rollout_id=row.id,
            time=now,
            actor=actor,
            trigger=trigger,
            from_state=old_state,
            to_state=new.state.value,
            from_stage=old_stage,
            to_stage=new.stage_index,
            devices=devices,
            reason=new.reason[: cfg.max_reason_chars],
            process=PROCESS,
        )
    )
    if new.state is not RolloutState.RUNNING:
        shadow_store.clear(s, row.id)  # a paused or stopped rollout shadows nowhere
    s.flush()


def holders(s: Session, device_ids: Iterable[str] | None = None) -> dict[str, str]:
    """``{device_id: rollout_id}`` for devices held by running, paused or waiting rollouts."""
    query = (
        select(RolloutDevice.device_id, RolloutDevice.rollout_id)
        .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
        .where(Rollout.state.in_([st.value for st in HOLDING]))
    )
    held = {device: rollout for device, rollout in s.execute(query)}
    if device_ids is None:
        return held
    return {d: held[d] for d in device_ids if d in held}


def history(s: Session, rollout_id: str, limit: int) -> list[RolloutHistory]:
    query = select(RolloutHistory).where(RolloutHistory.rollout_id == rollout_id)
    return list(s.scalars(query.order_by(RolloutHistory.id).limit(limit)))

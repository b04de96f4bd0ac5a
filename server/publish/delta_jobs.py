"""The delta job table: what publish enqueues and the background worker builds.

Publish adds one ``queued`` row per chosen base in the transaction that records
the release. A worker claims the oldest queued row (``FOR UPDATE SKIP LOCKED``
on PostgreSQL, and a state-checked UPDATE everywhere, so two replicas never
take the same job), marks it ``building``, reports progress, and ends it
``done``, ``skipped`` (the patch is not smaller than the file) or ``failed``
(with the reason). Finished jobs are never retried.

Restart safety: on PostgreSQL a builder holds a session advisory lock on its
job (a ``JobLease``) for as long as it builds; a ``building`` row whose lock
anyone can take has lost its builder and goes back to ``queued``. SQLite is one
process's database, so there every ``building`` row found at start is an orphan.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, select, text, update
from sqlalchemy.orm import Session

from agent.protocol.manifest import ModelManifest
from server.db.tables import DeltaJob, as_utc, utcnow

log = logging.getLogger(__name__)

QUEUED, BUILDING, DONE, SKIPPED, FAILED = "queued", "building", "done", "skipped", "failed"
PENDING = (QUEUED, BUILDING)
FINISHED = (DONE, SKIPPED, FAILED)
# The classid of the two-key advisory locks that lease a job (objid: the job id). Two-key
# locks never collide with the one-key locks of server.publish.repo_lock.
LEASE_CLASS = 0x0EFD


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker now builds: the target release and the base it patches from."""

    id: int
    name: str
    release: int
    variant: str
    target_sha256: str
    target_bytes: int
    base_release: int
    base_sha256: str


def enqueue(s: Session, new: ModelManifest, bases: Iterable[Any]) -> list[DeltaJob]:
    """One queued job per base (``server.publish.deltas.Base``), in the caller's transaction."""
    now = utcnow()
    jobs = [
        DeltaJob(
            name=new.name,
            release=new.release,
            variant=new.variant,
            target_sha256=new.sha256,
            target_bytes=new.length,
            base_release=b.release,
            base_sha256=b.sha256,
            state=QUEUED,
            progress=0.0,
            attempts=0,
            full_downloads=0,
            created_at=now,
        )
        for b in bases
    ]
    s.add_all(jobs)
    s.flush()
    return jobs


def claim_next(s: Session, worker: str, lease: JobLease | None = None) -> ClaimedJob | None:
    """Mark the oldest queued job ``building`` for ``worker``; None when there is none.

    With a ``lease`` (PostgreSQL), its lock is taken before the claim commits, so an
    orphan sweep never sees this job ``building`` without its builder's lock.
    """
    query = select(DeltaJob).where(DeltaJob.state == QUEUED).order_by(DeltaJob.id).limit(1)
    if s.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    job = s.scalars(query).first()
    if job is None:
        return None
    claimed = s.execute(
        update(DeltaJob)
        .where(DeltaJob.id == job.id, DeltaJob.state == QUEUED)
        .values(
            state=BUILDING,
            worker=worker[:64],
            started_at=utcnow(),
            finished_at=None,
            progress=0.0,
            attempts=DeltaJob.attempts + 1,
        )
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]  # another process won it
        return None
    if lease is not None:
        lease.acquire(job.id)
    return ClaimedJob(job.id, job.name, job.release, job.variant, job.target_sha256,
                      job.target_bytes, job.base_release, job.base_sha256)  # fmt: skip


def set_progress(s: Session, job_id: int, fraction: float) -> None:
    s.execute(
        update(DeltaJob)
        .where(DeltaJob.id == job_id, DeltaJob.state == BUILDING)
        .values(progress=min(max(fraction, 0.0), 1.0))
    )


def finish(
    s: Session, job_id: int, state: str, *, reason: str | None = None,
    delta_bytes: int | None = None, method: str | None = None,
) -> None:  # fmt: skip
    """Record a job's end; ``done`` and ``skipped`` carry the patch size and method."""
    if state not in FINISHED:
        raise ValueError(f"not a final state: {state}")
    s.execute(
        update(DeltaJob)
        .where(DeltaJob.id == job_id)
        .values(
            state=state,
            reason=None if reason is None else reason[:500],
            delta_bytes=delta_bytes,
            method=method,
            finished_at=utcnow(),
            progress=1.0 if state == DONE else DeltaJob.progress,
        )
    )


def requeue(s: Session, job_ids: Sequence[int]) -> None:
    """Put jobs this worker was building back in the queue (a clean stop)."""
    if job_ids:
        s.execute(
            update(DeltaJob)
            .where(DeltaJob.id.in_(job_ids), DeltaJob.state == BUILDING)
            .values(state=QUEUED, progress=0.0, started_at=None)
        )


def requeue_orphans(engine: Engine) -> list[int]:
    """``building`` jobs whose builder is gone go back to ``queued``; their ids."""
    with engine.connect() as conn:
        ids = [int(i) for i in conn.scalars(select(DeltaJob.id).where(DeltaJob.state == BUILDING))]
        if conn.dialect.name == "postgresql":
            ids = [i for i in ids if _lease_free(conn, i)]
        if ids:
            conn.execute(
                update(DeltaJob)
                .where(DeltaJob.id.in_(ids), DeltaJob.state == BUILDING)
                .values(state=QUEUED, progress=0.0, started_at=None)
            )
        conn.commit()
    if ids:
        log.warning("delta jobs %s were left building by a stopped server; queued again", ids)
    return ids


def _lease_free(conn: Connection, job_id: int) -> bool:
    got = conn.scalar(text("SELECT pg_try_advisory_lock(:c, :k)"),
                      {"c": LEASE_CLASS, "k": _lease_key(job_id)})  # fmt: skip
    if got:
        conn.execute(text("SELECT pg_advisory_unlock(:c, :k)"),
                     {"c": LEASE_CLASS, "k": _lease_key(job_id)})  # fmt: skip
    return bool(got)


def _lease_key(job_id: int) -> int:
    return job_id % (2**31)  # the int4 objid of a two-key advisory lock


class JobLease:
    """PostgreSQL: session advisory locks, one per job being built, on one connection.

    The connection lives as long as the builder: if the process dies, PostgreSQL drops
    the connection and with it the locks, and ``requeue_orphans`` can take the job back.
    """

    def __init__(self, engine: Engine) -> None:
        self._conn = engine.connect()

    def acquire(self, job_id: int) -> None:
        self._conn.execute(text("SELECT pg_advisory_lock(:c, :k)"),
                           {"c": LEASE_CLASS, "k": _lease_key(job_id)})  # fmt: skip
        self._conn.commit()

    def release(self, job_id: int) -> None:
        self._conn.execute(text("SELECT pg_advisory_unlock(:c, :k)"),
                           {"c": LEASE_CLASS, "k": _lease_key(job_id)})  # fmt: skip
        self._conn.commit()

    def close(self) -> None:
        """Drop every lock first: the connection goes back to a pool, where they would stay."""
        try:
            self._conn.execute(text("SELECT pg_advisory_unlock_all()"))
            self._conn.commit()
        finally:
            self._conn.close()


def job_json(job: DeltaJob) -> dict[str, Any]:
    """What ``edgefleet model show`` and the console show of one job."""

    def iso(value: datetime | None) -> str | None:
        value = as_utc(value)
        return None if value is None else value.isoformat()

    ratio = None
    if job.delta_bytes is not None and job.target_bytes:
        ratio = round(job.delta_bytes / job.target_bytes, 4)
    return {
        "id": job.id, "name": job.name, "release": job.release, "variant": job.variant,
        "base_release": job.base_release, "base_sha256": job.base_sha256, "state": job.state,
        "reason": job.reason, "progress": round(job.progress, 3), "delta_bytes": job.delta_bytes,
        "target_bytes": job.target_bytes, "ratio": ratio, "method": job.method,
        "attempts": job.attempts, "full_before_delta": job.full_downloads,
        "created_at": iso(job.created_at), "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
    }  # fmt: skip


def release_jobs(s: Session, name: str, release: int) -> list[dict[str, Any]]:
    """Every delta job of one release, by variant then base release (newest base first)."""
    rows = s.scalars(
        select(DeltaJob)
        .where(DeltaJob.name == name, DeltaJob.release == release)
        .order_by(DeltaJob.variant, DeltaJob.base_release.desc())
    ).all()
    return [job_json(j) for j in rows]


def recent_jobs(s: Session, limit: int = 100) -> list[dict[str, Any]]:
    """Pending jobs first, then the most recently created ones."""
    pending = DeltaJob.state.in_(PENDING)
    rows = s.scalars(
        select(DeltaJob).order_by(pending.desc(), DeltaJob.id.desc()).limit(limit)
    ).all()
    return [job_json(j) for j in rows]


def pending_count(s: Session) -> int:
    return int(s.scalar(select(func.count(DeltaJob.id)).where(DeltaJob.state.in_(PENDING))) or 0)

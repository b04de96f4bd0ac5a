"""Database engine, sessions and the SQLAlchemy table models.

SQLite (WAL) is the embedded default; PostgreSQL through psycopg 3 is the
scale-out choice. The same models and queries run on both.

Rollouts (later) build on these tables: ``device_tags`` makes tag selectors an
indexed query rather than a JSON scan, and ``assignments.rollout_id`` lets the
rollout engine write per-device assignments that the check-in already honours.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from server.config import normalize_db_url
from server.db.schema import drop_version_table, make_current

log = logging.getLogger(__name__)

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a bigint.
_BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSON,
    }


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    hardware_id: Mapped[str] = mapped_column(String(128), unique=True)
    profile: Mapped[str] = mapped_column(String(64))
    variant_preference: Mapped[list[str]] = mapped_column(JSON)
    tags: Mapped[dict[str, str]] = mapped_column(JSON)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    mqtt_password_hash: Mapped[str] = mapped_column(String(160))  # Mosquitto $7$ format
    created_at: Mapped[datetime]
    last_seen: Mapped[datetime | None] = mapped_column(index=True)  # range queries: who is silent
    state: Mapped[str] = mapped_column(String(32), default="enrolled")
    installed_name: Mapped[str | None] = mapped_column(String(64))
    installed_release: Mapped[int | None]
    installed_variant: Mapped[str | None] = mapped_column(String(32))
    installed_sha256: Mapped[str | None] = mapped_column(String(64))
    installed_slot: Mapped[str | None] = mapped_column(String(16))
    agent_version: Mapped[str] = mapped_column(String(32))


class DeviceTag(Base):
    """One row per device tag, so ``store=17`` selects by index on any database."""

    __tablename__ = "device_tags"
    __table_args__ = (Index("ix_device_tags_kv", "key", "value"),)

    device_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(128))


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    max_uses: Mapped[int | None]
    uses: Mapped[int] = mapped_column(default=0)
    note: Mapped[str] = mapped_column(String(200), default="")


class ReenrollApproval(Base):
    """An operator's one-time permission to re-enroll a device without its current token.

    Consumed (deleted) by the enrollment it admits; worthless after ``expires_at``."""

    __tablename__ = "reenroll_approvals"

    device_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "release", "variant", name="uq_models_release"),)

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    release: Mapped[int]
    variant: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64))
    length: Mapped[int] = mapped_column(BigInteger)
    target_path: Mapped[str] = mapped_column(String(255), unique=True)
    fp32_length: Mapped[int | None] = mapped_column(BigInteger)
    labels: Mapped[list[str]] = mapped_column(JSON)
    manifest: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


class Assignment(Base):
    """Which release a device or a tag should run; the newest row wins."""

    __tablename__ = "assignments"
    # With id last, "the newest for this target" is one backward index scan.
    __table_args__ = (Index("ix_assignments_target", "target_kind", "target_value", "id"),)

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    target_kind: Mapped[str] = mapped_column(String(16))  # "device" | "tag"
    target_value: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(64))
    release: Mapped[int]
    created_at: Mapped[datetime]
    rollout_id: Mapped[str | None] = mapped_column(String(64), index=True)


class RolloutVariant(Base):
    """The variant a rollout sends to one board profile (``--variant PROFILE=VARIANT``);
    the check-in serves it instead of the device's own first choice."""

    __tablename__ = "rollout_variants"

    rollout_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    profile: Mapped[str] = mapped_column(String(64), primary_key=True)
    variant: Mapped[str] = mapped_column(String(32))


class ShadowAssignment(Base):
    """A candidate a device should run in shadow beside its model (one per device).

    Written and removed by the rollout engine during a stage's shadow phase; the
    check-in reads it by primary key."""

    __tablename__ = "shadow_assignments"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    rollout_id: Mapped[str] = mapped_column(String(32), index=True)
    name: Mapped[str] = mapped_column(String(64))
    release: Mapped[int]
    every_n: Mapped[int]
    cpu_budget: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime]


class PushRequest(Base):
    """A device to tell "check in now" on its MQTT ``cmd`` topic (``server.push``).

    One row per device: however many changes queue up before the pacer reaches
    it, the device is told once. A table, not a queue in memory, so API replicas
    and the scheduler process can all ask and one pacer drains, oldest first."""

    __tablename__ = "push_requests"

    device_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    reason: Mapped[str] = mapped_column(String(16))  # desired | shadow | revert | operator
    requested_at: Mapped[datetime] = mapped_column(index=True)


class DeltaJob(Base):
    """One delta to build after a publish (``server.publish.delta_jobs``): target, base,
    state (queued, building, done, skipped, failed) and progress. A table, so replicas
    share the queue and a restarted server finds what was left building."""

    __tablename__ = "delta_jobs"
    __table_args__ = (
        UniqueConstraint("name", "release", "variant", "base_sha256", name="uq_delta_jobs_base"),
        Index("ix_delta_jobs_state", "state", "id"),
    )

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    release: Mapped[int]
    variant: Mapped[str] = mapped_column(String(32))
    target_sha256: Mapped[str] = mapped_column(String(64))
    target_bytes: Mapped[int] = mapped_column(BigInteger)
    base_release: Mapped[int]
    base_sha256: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(500))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    delta_bytes: Mapped[int | None] = mapped_column(BigInteger)
    method: Mapped[str | None] = mapped_column(String(32))
    worker: Mapped[str | None] = mapped_column(String(64))  # who claimed it last
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Full downloads of this target by devices on this base while it was not built yet.
    full_downloads: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_device_time", "device_id", "time"),)

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"))
    time: Mapped[datetime]
    type: Mapped[str] = mapped_column(String(64))
    state: Mapped[str | None] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(String(8))  # "http" | "mqtt"
    detail: Mapped[dict[str, Any]]


class TelemetryLatest(Base):
    """The newest payload per device and channel (telemetry, state, results, events)."""

    __tablename__ = "telemetry_latest"

    device_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    channel: Mapped[str] = mapped_column(String(16), primary_key=True)
    received_at: Mapped[datetime]
    payload: Mapped[dict[str, Any]]


class TelemetryRollup(Base):
    """One bucket (default 1 minute) of telemetry windows per device, profile and release.

    Sums and counts, not means, so buckets merge exactly across devices and time;
    latency is a sparse fixed-bucket histogram (``server.telemetry.latency_sketch``) for the
    same reason. Written only by ``server.telemetry.writer``.
    """

    __tablename__ = "telemetry_rollups"
    __table_args__ = (
        UniqueConstraint(
            "bucket", "device_id", "profile", "model", "release", "power_source", name="uq_rollup"
        ),
        Index("ix_rollups_device_bucket", "device_id", "bucket"),
        Index("ix_rollups_release_bucket", "model", "release", "bucket"),
    )

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    bucket: Mapped[datetime]
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"))
    profile: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64))  # "" when no model ran
    release: Mapped[int]  # 0 when no model ran
    power_source: Mapped[str] = mapped_column(String(16))  # sensor | estimate | unknown | ""
    windows: Mapped[int]
    inferences: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    window_s_sum: Mapped[float] = mapped_column(Float)
    fps_sum: Mapped[float] = mapped_column(Float)
    cpu_windows: Mapped[int]
    cpu_percent_sum: Mapped[float] = mapped_column(Float)
    rss_mb_max: Mapped[float | None] = mapped_column(Float)
    power_windows: Mapped[int]
    power_mw_sum: Mapped[float] = mapped_column(Float)
    power_mw_max: Mapped[float | None] = mapped_column(Float)
    energy_inferences: Mapped[int] = mapped_column(BigInteger)
    energy_mj_sum: Mapped[float] = mapped_column(Float)
    energy_above_idle_mj_sum: Mapped[float] = mapped_column(Float)
    thermal_windows: Mapped[int]
    throttled_windows: Mapped[int]
    temp_max_c: Mapped[float | None] = mapped_column(Float)
    invoke_hist: Mapped[dict[str, Any]]
    invoke_p95_ms: Mapped[float | None] = mapped_column(Float)
    invoke_max_ms: Mapped[float | None] = mapped_column(Float)
    e2e_hist: Mapped[dict[str, Any]]
    e2e_p95_ms: Mapped[float | None] = mapped_column(Float)
    outbox_dropped: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime]


class IngestCursor(Base):
    """The newest outbox ``seq`` (and its ``ts``) accepted per device, to drop QoS 1 repeats.

    Its row is also the per-device lock that serialises rollup writes between
    server replicas (``SELECT ... FOR UPDATE`` on PostgreSQL).
    """

    __tablename__ = "ingest_cursors"

    device_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int | None] = mapped_column(BigInteger)
    ts: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[datetime]


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str, pool_size: int = 16) -> Engine:
    url = normalize_db_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_pre_ping=True
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # ``pool_size`` covers the request threads; the overflow is for the server's own
    # threads (scheduler, rollup writer, ingest), so connections are reused, not churned.
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=8)


class Database:
    """An engine plus a session factory; ``session()`` commits or rolls back."""

    def __init__(self, url: str, pool_size: int = 16) -> None:
        self.url = normalize_db_url(url)
        self.engine = make_engine(self.url, pool_size)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def create_all(self) -> None:
        """Make the schema current through the migrations (``server.db.schema``)."""
        make_current(self.engine, Base.metadata)

    def drop_all(self) -> None:
        Base.metadata.drop_all(self.engine)
        drop_version_table(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        self.engine.dispose()

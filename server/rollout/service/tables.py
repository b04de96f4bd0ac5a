"""The rollout service's tables, on the server's one SQLAlchemy ``Base``.

- ``rollouts``: the spec and the stored ``RolloutStatus`` (JSON), with state and
  stage index copied into columns for queries, a ``version`` bumped on every
  status change (compare-and-set), the event cursor and the last decision.
- ``rollout_devices``: one row per selected device: its cohort (stage, rank),
  install status folded from events and check-ins, when it was told to
  install, the release it ran before (for revert) and its pre-update baseline.
- ``rollout_history``: every state or stage change, who made it (operator or
  engine, and which server process), so double transitions are visible.
- ``shadow_results``: per device, the sum of its shadow windows for the rollout
  (the confusion pairs as ``"serving,candidate": count``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from server.db.tables import Base

_BigId = BigInteger().with_variant(Integer(), "sqlite")


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))  # the release's model name
    release: Mapped[int]
    spec: Mapped[dict[str, Any]]
    status: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(32), index=True)
    stage_index: Mapped[int]
    version: Mapped[int] = mapped_column(default=1)
    devices: Mapped[int] = mapped_column(default=0)  # selected when it started
    event_cursor: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    last_tick_at: Mapped[datetime | None]
    last_decision: Mapped[dict[str, Any] | None]

    # Every UPDATE checks and bumps the version: a write based on a stale read fails.
    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012 - read once by the mapper


class RolloutDevice(Base):
    __tablename__ = "rollout_devices"
    __table_args__ = (
        Index("ix_rollout_devices_device", "device_id"),
        Index("ix_rollout_devices_stage", "rollout_id", "stage"),
    )

    rollout_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    stage: Mapped[int]
    rank: Mapped[int]
    status: Mapped[str] = mapped_column(String(16), default="pending")
    reason: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime | None]
    telemetry_from: Mapped[datetime | None]  # rollup buckets after this count for the release
    last_event_id: Mapped[int] = mapped_column(BigInteger, default=0)
    golden_accuracy: Mapped[float | None] = mapped_column(Float)
    previous_name: Mapped[str | None] = mapped_column(String(64))
    previous_release: Mapped[int | None]
    previous_variant: Mapped[str | None] = mapped_column(String(32))
    baseline_p95_ms: Mapped[float | None] = mapped_column(Float)
    baseline_power_mw: Mapped[float | None] = mapped_column(Float)
    reverted_at: Mapped[datetime | None]


class RolloutHistory(Base):
    __tablename__ = "rollout_history"

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("rollouts.id", ondelete="CASCADE"), index=True
    )
    time: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(16))  # "operator" | "engine"
    trigger: Mapped[str] = mapped_column(String(32))  # an Action or EngineEvent value
    from_state: Mapped[str] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    from_stage: Mapped[int]
    to_stage: Mapped[int]
    devices: Mapped[int] = mapped_column(default=0)  # devices told something by this change
    reason: Mapped[str] = mapped_column(Text, default="")
    process: Mapped[str] = mapped_column(String(128), default="")  # host:pid of the server


class ShadowResult(Base):
    __tablename__ = "shadow_results"

    rollout_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    windows: Mapped[int] = mapped_column(default=0)
    shadowed: Mapped[int] = mapped_column(BigInteger, default=0)
    skipped: Mapped[int] = mapped_column(BigInteger, default=0)
    agreed: Mapped[int] = mapped_column(BigInteger, default=0)
    pairs: Mapped[dict[str, Any]]
    labels: Mapped[list[str]] = mapped_column(JSON)
    candidate_p95_ms: Mapped[float | None] = mapped_column(Float)
    serving_p95_ms: Mapped[float | None] = mapped_column(Float)
    candidate_mj: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(String(200))
    updated_at: Mapped[datetime]

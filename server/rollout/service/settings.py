"""Limits and timings of the rollout service (the IO side of the rollout engine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from server.config import ServerConfig
from server.rollout.core.cohorts import CohortConfig
from server.rollout.core.policy import PolicyConfig


@dataclass(frozen=True)
class ServiceConfig:
    """Every knob of the rollout service in one place.

    ``event_settle`` is how old an event must be before the per-rollout event
    cursor moves past it: on PostgreSQL ids are handed out at insert but become
    visible at commit, so a slightly younger id can still appear below the
    newest one seen; events newer than this are read again next tick (folding
    is idempotent per device, by event id).
    """

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    cohorts: CohortConfig = field(default_factory=CohortConfig)
    event_settle: timedelta = timedelta(seconds=30)
    # Check-ins are read again this far back: one stamped just before a tick's read
    # may commit just after it.
    checkin_settle: timedelta = timedelta(seconds=1)
    cursor_interval: timedelta = timedelta(seconds=10)  # how often the stored cursor moves
    # Devices told to install per tick: a stage of 32,500 is told over a few ticks, so no
    # tick holds the rollout's lock for a minute (devices learn at their next check-in).
    max_starts_per_tick: int = 2000
    baseline_lookback: timedelta = timedelta(hours=6)  # telemetry before the update counted
    min_gate_windows: int = 3  # telemetry windows behind a device's latency or power figure
    rollup_bucket: timedelta = timedelta(seconds=60)  # must match ServerConfig.rollup_bucket_s
    in_chunk: int = 500  # ids per ``IN (...)`` list: under SQLite's bound-parameter limit
    insert_chunk: int = 1000  # rows per executemany batch
    max_reason_chars: int = 2000
    max_stored_devices: int = 100  # device ids kept per gate in the stored last decision
    max_overlap_listed: int = 5  # device ids named in an overlap or revert refusal
    list_limit: int = 1000  # rollouts or devices returned by one list call
    start_lock_key: int = 0x45_46_52_4F_4C_4C_53_54  # "EFROLLST": the PG advisory key for starts

    @classmethod
    def from_server(cls, cfg: ServerConfig) -> ServiceConfig:
        return cls(rollup_bucket=timedelta(seconds=cfg.rollup_bucket_s))


DEFAULT_CONFIG = ServiceConfig()

"""Counters of a simulator run: requests, latencies, errors, updates, telemetry.

Single-threaded by design: every counter is touched only from the
simulator's asyncio loop; ``report`` makes a plain-data snapshot that other
threads may read.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from agent.telemetry.histogram import LatencyHistogram

_NS = 1e9
_MAX_ERROR_KINDS = 50


@dataclass(frozen=True)
class Report:
    elapsed_s: float
    enrolled: int
    checkins: int
    checkins_per_s: float
    checkin_p50_ms: float | None
    checkin_p99_ms: float | None
    checkin_max_ms: float | None
    not_modified: int  # check-ins answered 304 (conditional, nothing changed)
    checkin_p99_by_phase_ms: dict[str, float | None]  # e.g. "steady", "rollout"
    events: int
    errors: int
    error_kinds: dict[str, int]
    updates_started: int
    committed: int
    failed: int
    rolled_back: int
    silent: int
    windows: int
    shadow_windows: int  # results windows with a shadow block
    mqtt_dropped: int
    mqtt_linked: int
    releases: dict[str, int]  # "name@release" -> devices running it
    pushes: int  # checkin commands received on cmd topics
    downloaded_bytes: int  # model and metadata bytes the devices received over HTTP
    last_commit_s: float | None  # when the latest committed update was reported, on the
    # run's clock (seconds since the stats began)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        p99 = "-" if self.checkin_p99_ms is None else f"{self.checkin_p99_ms:.1f}"
        running = ", ".join(f"{k}: {v}" for k, v in sorted(self.releases.items())) or "none"
        return (
            f"{self.enrolled} devices, {self.checkins} check-ins "
            f"({self.checkins_per_s:.1f}/s, p99 {p99} ms, {self.not_modified} not modified), "
            f"{self.pushes} pushes, {self.events} events, "
            f"{self.errors} errors; updates {self.committed} committed, {self.failed} failed, "
            f"{self.rolled_back} rolled back, {self.silent} silent; {self.windows} telemetry "
            f"windows, {self.shadow_windows} shadow windows; {self.downloaded_bytes} bytes "
            f"downloaded; running {running}"
        )


class FleetStats:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.checkin_latency = LatencyHistogram()
        self.checkins = 0
        self.events = 0
        self.enrolled = 0
        self.errors: Counter[str] = Counter()
        self.updates_started = 0
        self.committed = 0
        self.failed = 0
        self.rolled_back = 0
        self.silent = 0
        self.windows = 0
        self.shadow_windows = 0
        self.not_modified = 0
        self.pushes = 0
        self.downloaded_bytes = 0
        self.last_commit_at: float | None = None  # time.monotonic()
        self.phase = "steady"
        self.phase_latency: dict[str, LatencyHistogram] = {}

    def set_phase(self, name: str) -> None:
        """Check-in latencies from now on count towards ``name`` (and the overall figure)."""
        self.phase = name

    def committed_now(self) -> None:
        self.committed += 1
        self.last_commit_at = time.monotonic()

    def reset_checkins(self) -> None:
        """Start a fresh measurement period for check-in rate and latency."""
        self.started = time.monotonic()
        self.checkin_latency = LatencyHistogram()
        self.checkins = 0
        self.not_modified = 0
        self.phase_latency = {}

    def checkin(self, seconds: float, not_modified: bool = False) -> None:
        self.checkins += 1
        self.not_modified += not_modified
        self.checkin_latency.record(seconds * _NS)
        phase = self.phase_latency.get(self.phase)
        if phase is None:
            phase = self.phase_latency[self.phase] = LatencyHistogram()
        phase.record(seconds * _NS)

    def error(self, kind: str) -> None:
        if kind in self.errors or len(self.errors) < _MAX_ERROR_KINDS:
            self.errors[kind] += 1
        else:
            self.errors["other"] += 1

    def report(self, releases: dict[str, int], mqtt_dropped: int, linked: int) -> Report:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        hist = self.checkin_latency

        def ms(ns: float | None) -> float | None:
            return None if ns is None else round(ns / 1e6, 3)

        return Report(
            elapsed_s=round(elapsed, 3),
            enrolled=self.enrolled,
            checkins=self.checkins,
            checkins_per_s=round(self.checkins / elapsed, 1),
            checkin_p50_ms=ms(hist.p50),
            checkin_p99_ms=ms(hist.p99),
            checkin_max_ms=ms(hist.max),
            not_modified=self.not_modified,
            checkin_p99_by_phase_ms={k: ms(h.p99) for k, h in self.phase_latency.items()},
            events=self.events,
            errors=sum(self.errors.values()),
            error_kinds=dict(self.errors),
            updates_started=self.updates_started,
            committed=self.committed,
            failed=self.failed,
            rolled_back=self.rolled_back,
            silent=self.silent,
            windows=self.windows,
            shadow_windows=self.shadow_windows,
            mqtt_dropped=mqtt_dropped,
            mqtt_linked=linked,
            releases=releases,
            pushes=self.pushes,
            downloaded_bytes=self.downloaded_bytes,
            last_commit_s=(
                None
                if self.last_commit_at is None
                else round(self.last_commit_at - self.started, 3)
            ),
        )

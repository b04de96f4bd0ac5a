"""Prometheus metrics of the fleet, on a private registry (never the process-global one).

Fleet gauges are computed at scrape time from the database, so every server
replica answers the same: device counts and online devices from the
inventory, and power, energy per inference, latency p95, temperature and
throttling from the telemetry rollups of the last ``metrics_window_s``. A
scrape within ``metrics_cache_s`` of the previous one reuses its answer.
Ingest and scheduler counters (this process) are in ``process_metrics``.

Power gauges carry ``source`` (sensor, estimate, unknown), because an
estimate from CPU load must never pass for a measurement.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import aliased

from server.config import ServerConfig
from server.db.tables import Database, Device, TelemetryLatest, TelemetryRollup, utcnow
from server.mqtt.ingest import TelemetryIngest
from server.rollout.service import shadow_store
from server.telemetry import accuracy_store, latency_sketch
from server.telemetry.process_metrics import IngestCollector, SchedulerCollector, SchedulerStats
from server.telemetry.windows import RollupValues
from server.telemetry.writer import RollupWriter

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_RELEASE_LABELS = ("profile", "model", "release")
_POWER_LABELS = (*_RELEASE_LABELS, "source")


@dataclass
class _Group:
    values: RollupValues = field(default_factory=RollupValues)
    devices: set[str] = field(default_factory=set)
    throttled: set[str] = field(default_factory=set)


def _release_label(release: int) -> str:
    return str(release) if release else ""


class FleetCollector(Collector):
    """Fleet gauges from the database (see the module docstring)."""

    def __init__(self, db: Database, config: ServerConfig) -> None:
        self._db = db
        self._config = config
        self._lock = threading.Lock()
        self._cached: list[Metric] = []
        self._cached_at = -float("inf")

    @property
    def online_window_s(self) -> float:
        return self._config.presence_window_s

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            if time.monotonic() - self._cached_at >= self._config.metrics_cache_s:
                self._cached = list(self._build())
                self._cached_at = time.monotonic()
            return list(self._cached)

    def _build(self) -> Iterator[Metric]:
        now = utcnow()
        online_since = now - timedelta(seconds=self.online_window_s)
        window_since = now - timedelta(seconds=self._config.metrics_window_s)
        state = aliased(TelemetryLatest)
        status = state.payload["status"].as_string()
        with self._db.session() as s:
            enrolled = s.execute(select(Device.profile, func.count()).group_by(Device.profile))
            online = s.execute(
                select(Device.profile, func.count())
                .select_from(Device)
                .outerjoin(state, and_(state.device_id == Device.id, state.channel == "state"))
                .where(Device.last_seen >= online_since, or_(status.is_(None), status != "offline"))
                .group_by(Device.profile)
            )
            yield _gauge("edgefleet_devices", "Enrolled devices.", ("profile",), enrolled)
            yield _gauge(
                "edgefleet_devices_online",
                f"Devices seen within {self.online_window_s:g}s and not offline.",
                ("profile",),
                online,
            )
            rows = s.execute(
                select(TelemetryRollup.__table__).where(TelemetryRollup.bucket >= window_since)
            )
            yield from self._telemetry(rows)
            yield from _accuracy(accuracy_store.fleet_accuracy(s)["releases"])
            yield from _shadow(shadow_store.live(s))

    def _telemetry(self, rows: Iterable[object]) -> Iterator[Metric]:
        by_power: dict[tuple[str, str, str, str], _Group] = {}
        by_release: dict[tuple[str, str, str], _Group] = {}
        fleet_release: dict[tuple[str, str], _Group] = {}
        by_profile: dict[str, _Group] = {}
        for row in rows:
            values = RollupValues.from_row(row)
            device: str = getattr(row, "device_id")  # noqa: B009 - a Core row
            profile: str = getattr(row, "profile")  # noqa: B009
            model, release = getattr(row, "model"), _release_label(getattr(row, "release"))  # noqa: B009
            source: str = getattr(row, "power_source")  # noqa: B009
            groups = [
                by_release.setdefault((profile, model, release), _Group()),
                fleet_release.setdefault((model, release), _Group()),
                by_profile.setdefault(profile, _Group()),
            ]
            if source:
                groups.append(by_power.setdefault((profile, model, release, source), _Group()))
            for group in groups:
                group.values.merge(values)
                group.devices.add(device)
                if values.throttled_windows:
                    group.throttled.add(device)

        window = f"over the last {self._config.metrics_window_s:g}s"
        yield _gauge(
            "edgefleet_devices_reporting",
            f"Devices that sent telemetry {window}.",
            _RELEASE_LABELS,
            ((*k, len(g.devices)) for k, g in by_release.items()),
        )
        yield _gauge(
            "edgefleet_power_mw",
            f"Mean power draw in mW {window}, by where it comes from.",
            _POWER_LABELS,
            ((*k, g.values.power_mw_mean) for k, g in by_power.items()),
        )
        yield _gauge(
            "edgefleet_energy_per_inference_mj",
            f"Energy per inference in mJ (total energy / inferences) {window}.",
            _POWER_LABELS,
            ((*k, g.values.mj_per_inference) for k, g in by_power.items()),
        )
        yield _gauge(
            "edgefleet_energy_per_inference_above_idle_mj",
            f"Energy per inference above the idle draw, in mJ, {window}.",
            _POWER_LABELS,
            ((*k, g.values.mj_per_inference_above_idle) for k, g in by_power.items()),
        )
        yield _latency(
            "edgefleet_latency_p95_seconds",
            f"p95 latency in seconds per release across the fleet {window} (merged histograms).",
            ("model", "release"),
            fleet_release.items(),
        )
        yield _latency(
            "edgefleet_latency_p95_by_profile_seconds",
            f"p95 latency in seconds per board profile and release {window}.",
            _RELEASE_LABELS,
            by_release.items(),
        )
        yield _gauge(
            "edgefleet_throttled_devices",
            f"Devices that reported thermal or power throttling {window}.",
            ("profile",),
            ((k, len(g.throttled)) for k, g in by_profile.items()),
        )
        yield _gauge(
            "edgefleet_temperature_max_celsius",
            f"Hottest reported thermal zone {window}.",
            ("profile",),
            ((k, g.values.temp_max_c) for k, g in by_profile.items()),
        )


def _accuracy(rows: list[dict[str, Any]]) -> Iterator[Metric]:
    """Field accuracy per release and profile over the accuracy lookback (hourly buckets)."""
    lookback = f"over the last {accuracy_store.DEFAULT_LOOKBACK_HOURS}h"
    keyed = [((r["profile"], r["model"], str(r["release"])), r) for r in rows]
    judged = [(k, r["drift"]) for k, r in keyed
              if r["drift"] is not None and r["drift"]["status"] != "insufficient"]  # fmt: skip
    yield _gauge(
        "edgefleet_accuracy_golden_set_ratio",
        "Mean of each device's newest golden-set accuracy (0..1) for the release.",
        _RELEASE_LABELS,
        ((*k, r["golden_set_accuracy"]) for k, r in keyed),
    )
    yield _gauge(
        "edgefleet_accuracy_confidence_mean_ratio",
        f"Mean top-1 confidence (0..1, from histogram bin midpoints) {lookback}.",
        _RELEASE_LABELS,
        ((*k, r["mean_confidence"]) for k, r in keyed),
    )
    yield _gauge(
        "edgefleet_accuracy_inferences",
        f"Inferences counted in results windows {lookback}.",
        _RELEASE_LABELS,
        ((*k, r["inferences"]) for k, r in keyed),
    )
    yield _gauge(
        "edgefleet_accuracy_class_drift_psi",
        f"PSI of predicted classes against the release's validation reference {lookback} "
        "(0.1 watch, 0.25 drift).",
        _RELEASE_LABELS,
        ((*k, d["psi"]) for k, d in judged),
    )
    yield _gauge(
        "edgefleet_accuracy_confidence_drift_psi",
        f"PSI of top-1 confidence against the release's validation reference {lookback}.",
        _RELEASE_LABELS,
        ((*k, d["confidence_psi"]) for k, d in judged),
    )
    yield _gauge(
        "edgefleet_accuracy_drifting_devices",
        f"Devices whose own class PSI is at or above the drift threshold {lookback}.",
        _RELEASE_LABELS,
        ((*k, len(r["drifting_devices"])) for k, r in keyed if r["drift"] is not None),
    )


def _shadow(rows: list[dict[str, Any]]) -> Iterator[Metric]:
    """Shadow evaluation of rollouts that hold their devices (candidate against serving)."""
    labels = ("rollout", "model", "release", "profile")
    keyed = [((r["rollout"], r["model"], str(r["release"]), r["profile"]), r) for r in rows]
    for name, read, doc in (
        ("edgefleet_shadow_agreement_ratio", _field("agreement"), "Top-1 agreement."),
        (
            "edgefleet_shadow_class_agreement_min_ratio",
            _field("class_min"),
            "Weakest class with 5 frames or more.",
        ),
        ("edgefleet_shadow_frames", _field("shadowed"), "Frames the candidate ran in shadow."),
        ("edgefleet_shadow_candidate_p95_seconds", _candidate_p95_s, "Candidate p95 invoke."),
    ):
        yield _gauge(name, doc, labels, ((*k, read(r)) for k, r in keyed))


def _field(key: str) -> Callable[[dict[str, Any]], object]:
    return lambda row: row[key]


def _candidate_p95_s(row: dict[str, Any]) -> float | None:
    """Prometheus wants base units (promtool rejects ``_ms``); the reports keep milliseconds."""
    ms = row.get("candidate_p95_ms")
    return None if ms is None else float(ms) / 1000.0


def _gauge(
    name: str, doc: str, labels: tuple[str, ...], samples: Iterable[Iterable[object]]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    for sample in samples:
        *label_values, value = tuple(sample)
        if isinstance(value, int | float):
            family.add_metric([str(v) for v in label_values], float(value))
    return family


def _latency(
    name: str, doc: str, labels: tuple[str, ...], groups: Iterable[tuple[tuple[str, ...], _Group]]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[*labels, "kind"])
    for key, group in groups:
        for kind, sketch in (("invoke", group.values.invoke), ("e2e", group.values.e2e)):
            p95 = latency_sketch.quantile(sketch, 0.95)
            if p95 is not None:
                family.add_metric([*key, kind], p95 / 1000.0)  # sketches hold ms
    return family


class FleetMetrics:
    """The private registry that ``GET /metrics`` renders."""

    def __init__(
        self,
        db: Database,
        config: ServerConfig,
        *,
        writer: RollupWriter | None = None,
        ingest: TelemetryIngest | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(FleetCollector(db, config))
        self.registry.register(IngestCollector(writer, ingest))

    def add_scheduler(self, scheduler: SchedulerStats) -> None:
        self.registry.register(SchedulerCollector(scheduler))

    def render(self) -> bytes:
        return generate_latest(self.registry)

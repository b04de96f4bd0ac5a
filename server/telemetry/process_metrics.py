"""Counters of this server process: its telemetry ingest and its rollout scheduler.

Unlike the fleet gauges, which every replica computes alike from the database,
these describe one process (the one running the background services), so a
replica without an ingest or a scheduler simply serves none of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.mqtt.ingest import TelemetryIngest
from server.telemetry.writer import RollupWriter


class IngestCollector(Collector):
    """Counters of this process's telemetry ingest."""

    def __init__(self, writer: RollupWriter | None, ingest: TelemetryIngest | None) -> None:
        self._writer = writer
        self._ingest = ingest

    def collect(self) -> Iterable[Metric]:
        if self._ingest is not None:
            yield GaugeMetricFamily(
                "edgefleet_ingest_connected",
                "1 while the telemetry subscriber is connected to the broker.",
                value=1.0 if self._ingest.connected else 0.0,
            )
        stats = self._ingest.stats if self._ingest is not None else None
        written = self._writer.stats if self._writer is not None else None
        messages = CounterMetricFamily(
            "edgefleet_ingest_messages",
            "MQTT messages by outcome (duplicate: a QoS 1 repeat of an accepted outbox seq).",
            labels=["result"],
        )
        if stats is not None:
            messages.add_metric(["stored"], stats.stored)
            messages.add_metric(["duplicate"], stats.duplicates)
            messages.add_metric(["rejected"], stats.rejected)
        yield messages
        if self._ingest is not None:
            results = CounterMetricFamily(
                "edgefleet_accuracy_results",
                "results windows by outcome (rejected: not a well-formed window, not stored).",
                labels=["result"],
            )
            shadow = CounterMetricFamily(
                "edgefleet_shadow_results",
                "shadow blocks by outcome (not_assigned: the device was not shadowing for it).",
                labels=["result"],
            )
            for outcome, count in self._ingest.results.snapshot().items():
                if outcome.startswith("shadow_"):
                    shadow.add_metric([outcome.removeprefix("shadow_")], count)
                else:
                    results.add_metric([outcome], count)
            yield results
            yield shadow
        if written is None or self._writer is None:
            return
        for name, doc, value in (
            ("edgefleet_ingest_windows", "Telemetry windows rolled up.", written.windows),
            (
                "edgefleet_ingest_batches",
                "Batches written (one transaction each).",
                written.batches,
            ),
            (
                "edgefleet_ingest_flush_seconds",
                "Time spent writing batches.",
                written.flush_seconds,
            ),
            (
                "edgefleet_device_outbox_dropped",
                "Messages devices reported dropping from a full offline outbox.",
                written.outbox_dropped,
            ),
            ("edgefleet_rollups_pruned", "Rollup rows removed by retention.", written.pruned),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily(
            "edgefleet_ingest_queue_depth",
            "Messages waiting for the next batch.",
            value=self._writer.queue_depth,
        )


class SchedulerStats(Protocol):
    """A rollout scheduler, in a thread or a process of its own."""

    @property
    def ticks(self) -> int: ...
    @property
    def tick_seconds(self) -> float: ...
    @property
    def last_round_s(self) -> float: ...


class SchedulerCollector(Collector):
    """How long this server's rollout engine takes per tick."""

    def __init__(self, scheduler: SchedulerStats) -> None:
        self._scheduler = scheduler

    def collect(self) -> Iterable[Metric]:
        sched = self._scheduler
        yield CounterMetricFamily(
            "edgefleet_rollout_ticks", "Rollout ticks run by this server.", value=sched.ticks
        )
        yield CounterMetricFamily(
            "edgefleet_rollout_tick_seconds",
            "Time spent in rollout ticks by this server.",
            value=sched.tick_seconds,
        )
        yield GaugeMetricFamily(
            "edgefleet_rollout_last_round_seconds",
            "Duration of the scheduler's last round over every active rollout.",
            value=sched.last_round_s,
        )

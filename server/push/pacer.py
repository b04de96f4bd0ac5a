"""The paced publisher: drains ``push_requests`` onto devices' MQTT ``cmd`` topics.

A push makes the device check in at once, so pushing a 65,000-device stage in
one burst would be a check-in storm. The pacer sends at most ``rate_per_s``
commands a second, oldest request first, in small batches (``batch_s`` of
rate each): claim a batch, publish each command at QoS 1 (not retained: a
device offline now learns of the change from its first check-in anyway), delete
the rows sent, commit. A batch that fails to publish stays queued and is
retried after ``idle_s``; nothing is sent while the MQTT link is down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from server.db.tables import Database
from server.errors import ServerError
from server.push import queue

log = logging.getLogger(__name__)

# (device id, command): ``TelemetryIngest.publish_command``
Send = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class PushStats:
    pushed: int  # commands this pacer published
    failed: int  # publish attempts that failed (their requests stay queued)


class PushPacer:
    """One thread draining the push queue at ``rate_per_s``; ``start`` / ``stop``."""

    def __init__(
        self,
        db: Database,
        send: Send,
        rate_per_s: float,
        *,
        connected: Callable[[], bool] = lambda: True,
        batch_s: float = 0.1,
        idle_s: float = 0.25,
    ) -> None:
        if not rate_per_s > 0:
            raise ValueError("rate_per_s must be positive")
        self._db = db
        self._send = send
        self._rate = rate_per_s
        self._connected = connected
        self._batch = max(1, round(rate_per_s * batch_s))
        self._idle_s = idle_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pushed = 0
        self._failed = 0

    @property
    def batch(self) -> int:
        """Requests claimed and sent together, ``batch_s`` worth at the rate."""
        return self._batch

    @property
    def stats(self) -> PushStats:
        with self._lock:
            return PushStats(self._pushed, self._failed)

    def depth(self) -> int:
        """Requests waiting in the table (every replica's)."""
        with self._db.engine.connect() as conn:
            return queue.depth(conn)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="push-pacer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def drain_once(self, limit: int) -> int:
        """Claim up to ``limit`` requests, publish them, delete the sent ones; how many sent."""
        sent: list[queue.Claimed] = []
        failure: ServerError | None = None
        with self._db.engine.begin() as conn:
            for claimed in queue.claim(conn, limit):
                try:
                    self._send(claimed.device_id, claimed.command())
                except ServerError as err:
                    failure = err
                    break
                sent.append(claimed)
            queue.remove(conn, sent)
        with self._lock:
            self._pushed += len(sent)
            self._failed += failure is not None
        if failure is not None:
            raise failure
        return len(sent)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            if not self._connected():
                self._stop.wait(self._idle_s)
                continue
            try:
                sent = self.drain_once(self._batch)
            except (ServerError, SQLAlchemyError) as err:
                log.warning("push pacer: %s; retrying in %.2fs", err, self._idle_s)
                self._stop.wait(self._idle_s)
                next_at = time.monotonic()
                continue
            if sent == 0:
                self._stop.wait(self._idle_s)
                next_at = time.monotonic()
                continue
            # Spend the time this batch is worth at the rate; a late batch earns no burst.
            now = time.monotonic()
            next_at = max(next_at, now - self._batch / self._rate) + sent / self._rate
            if next_at > now:
                self._stop.wait(next_at - now)


class PushCollector(Collector):
    """``/metrics``: commands this server pushed, and the queue every replica shares."""

    def __init__(self, pacer: PushPacer) -> None:
        self._pacer = pacer

    def collect(self) -> Iterable[Metric]:
        stats = self._pacer.stats
        yield CounterMetricFamily(
            "edgefleet_push_commands",
            "Check-in commands pushed by this server.",
            value=stats.pushed,
        )
        yield CounterMetricFamily(
            "edgefleet_push_failures",
            "Push batches whose publish failed (their requests stay queued).",
            value=stats.failed,
        )
        try:
            waiting = self._pacer.depth()
        except SQLAlchemyError as err:
            log.warning("push queue depth unavailable: %s", err)
            return
        yield GaugeMetricFamily(
            "edgefleet_push_queue_depth", "Devices waiting to be told to check in.", value=waiting
        )

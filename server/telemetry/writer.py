"""Batched telemetry ingest: a bounded queue and one writer thread.

The MQTT thread only queues messages (``submit``); the writer takes up to
``flush_max_messages``, or whatever arrived within ``flush_interval_s`` of
the first, and writes them in ONE transaction (``storage.write_batch``:
latest payloads, dedupe by (device, seq), 1-minute rollups). Each message's
``ack`` runs after its commit; the ingest makes that the broker PUBACK when
``ingest_ack_after_commit`` is on (then a server crash loses nothing a device
was told was delivered). Either way there is no transaction per message at
fleet scale. A full queue makes ``submit`` wait, which slows the MQTT reads:
back-pressure, not loss.

An unreachable database is retried with backoff; a batch that fails for
another reason is retried one message at a time, so one poison message is
dropped (and logged) instead of the batch. Rollups past the retention are
pruned every ``prune_interval_s``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from server.db.tables import Database
from server.errors import ServerError
from server.telemetry.storage import BatchResult, IngestMessage, RollupConfig, prune, write_batch

__all__ = [
    "IngestClosedError",
    "IngestMessage",
    "Listener",
    "RollupConfig",
    "RollupWriter",
    "WriterStats",
]

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 30.0
Listener = Callable[[IngestMessage], None]


class IngestClosedError(ServerError):
    """A message was submitted after the writer stopped."""


@dataclass(frozen=True)
class WriterStats:
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    windows: int = 0
    outbox_dropped: int = 0  # messages devices reported losing to outbox overflow
    batches: int = 0
    flush_seconds: float = 0.0
    pruned: int = 0


class RollupWriter:
    """The queue and the writer thread in front of ``write_batch``."""

    def __init__(self, db: Database, config: RollupConfig | None = None) -> None:
        self.db = db
        self.config = config or RollupConfig()
        self._queue: queue.Queue[IngestMessage] = queue.Queue(maxsize=self.config.queue_max)
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._stats = WriterStats()
        self._stopping = threading.Event()
        self._abandon = threading.Event()
        self._thread: threading.Thread | None = None

    # --- producer side (the MQTT thread) -------------------------------------------
    def submit(self, message: IngestMessage) -> None:
        """Queue a message; waits while the queue is full, so MQTT reads slow down."""
        while True:
            if self._stopping.is_set():
                raise IngestClosedError("the telemetry writer is stopped")
            try:
                self._queue.put(message, timeout=0.5)
                return
            except queue.Full:
                continue

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` with every accepted message, in order, after its commit."""
        self._listeners.append(listener)

    @property
    def stats(self) -> WriterStats:
        with self._lock:
            return self._stats

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # --- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        self._stopping.clear()
        self._abandon.clear()
        self._thread = threading.Thread(target=self._run, name="telemetry-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop; unwritten messages stay unacknowledged."""
        self._stopping.set()
        if self._thread is None:
            return
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("telemetry writer did not drain in %.0fs; giving up", timeout_s)
            self._abandon.set()
            self._thread.join(5.0)
        self._thread = None

    def prune(self, now: datetime | None = None) -> int:
        removed = prune(self.db, self.config.retention_s, now)
        with self._lock:
            self._stats = replace(self._stats, pruned=self._stats.pruned + removed)
        if removed:
            log.info("pruned %d telemetry rollups older than the retention", removed)
        return removed

    # --- writer thread ----------------------------------------------------------------
    def _run(self) -> None:
        next_prune = time.monotonic()
        while True:
            batch = self._collect()
            if batch:
                self._write(batch)
            elif self._stopping.is_set():
                return
            if time.monotonic() >= next_prune and not self._stopping.is_set():
                next_prune = time.monotonic() + self.config.prune_interval_s
                try:
                    self.prune()
                except SQLAlchemyError as err:
                    log.error("pruning telemetry rollups failed: %s", err)

    def _collect(self) -> list[IngestMessage]:
        """A batch: ends at ``flush_max_messages``, ``flush_interval_s`` or an idle gap."""
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.config.flush_interval_s
        while len(batch) < self.config.flush_max_messages:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    batch.append(self._queue.get_nowait())  # a backlog: take what is there
                else:
                    batch.append(self._queue.get(timeout=min(remaining, self.config.flush_idle_s)))
            except queue.Empty:
                break
        return batch

    def _write(self, batch: list[IngestMessage]) -> None:
        """Write with retries while the database is unreachable; isolate a poison message."""
        backoff = self.config.retry_backoff_s
        while not self._abandon.is_set():
            started = time.perf_counter()
            try:
                with self.db.session() as s:
                    result = write_batch(s, batch, self.config)
            except DBAPIError as err:
                if err.connection_invalidated or _is_transient(err):
                    log.warning(
                        "telemetry batch not written (%s); retrying in %.0fs", err.orig, backoff
                    )
                    self._abandon.wait(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF_S)
                    continue
                self._split_or_reject(batch, err)
                return
            except SQLAlchemyError as err:
                self._split_or_reject(batch, err)
                return
            self._done(batch, result, time.perf_counter() - started)
            return

    def _split_or_reject(self, batch: list[IngestMessage], err: Exception) -> None:
        if len(batch) > 1:
            log.warning("telemetry batch of %d failed (%s); writing one by one", len(batch), err)
            for message in batch:
                self._write([message])
            return
        log.error(
            "dropping a telemetry message from %s that cannot be stored: %s",
            batch[0].device_id,
            err,
        )
        self._done(batch, BatchResult([], 0, 1, 0, 0), 0.0)

    def _done(self, batch: list[IngestMessage], result: BatchResult, seconds: float) -> None:
        for message in batch:
            if message.ack is not None:
                message.ack()
        with self._lock:
            st = self._stats
            self._stats = WriterStats(
                stored=st.stored + len(result.accepted),
                duplicates=st.duplicates + result.duplicates,
                rejected=st.rejected + result.rejected,
                windows=st.windows + result.windows,
                outbox_dropped=st.outbox_dropped + result.outbox_dropped,
                batches=st.batches + 1,
                flush_seconds=st.flush_seconds + seconds,
                pruned=st.pruned,
            )
        if result.rejected:
            log.warning("dropped %d message(s) from unknown devices", result.rejected)
        for message in result.accepted:
            for listener in self._listeners:
                try:
                    listener(message)
                except Exception:
                    log.exception("telemetry listener failed")


def _is_transient(err: DBAPIError) -> bool:
    """Connection loss and lock timeouts are worth retrying; bad data is not."""
    name = type(err).__name__
    return name in ("OperationalError", "InterfaceError") or "locked" in str(err.orig).lower()

"""The ingest's hook for ``results`` messages: parse, merge in memory, write in batches.

The MQTT network thread only parses a payload and adds it to a pending sum
keyed by (device, model, release, hour); a background thread writes the sums
every ``flush_interval_s`` in one transaction (``accuracy_store.record_results``),
so a large fleet costs one transaction a second, not one per device window.
A payload that is not a well-formed window is counted as ``rejected`` and kept
out of the accuracy table (the latest-payload store still shows it). Outcomes
are counted per window: stored, rejected, unknown_device, failed (a database
error; that batch is lost, the counter says so). Nothing here raises into paho.
Hours older than ``accuracy_store.RETENTION`` (30 days) are pruned hourly.

A ``shadow`` block in the same message (a rollout's candidate run beside the
serving model) is summed per (rollout, device) the same way and added to the
rollout's ``shadow_results`` in the same flush; its outcomes are counted apart.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from server.db.tables import Database, utcnow
from server.errors import InvalidInputError
from server.rollout.core.shadow import ShadowReport, parse_window
from server.rollout.service import shadow_store
from server.telemetry import accuracy
from server.telemetry.accuracy import ResultsWindow
from server.telemetry.accuracy_store import RETENTION, bucket_of, prune, record_results

log = logging.getLogger(__name__)

OUTCOMES = ("stored", "rejected", "unknown_device", "failed")
SHADOW_OUTCOMES = ("shadow_stored", "shadow_rejected", "shadow_not_assigned", "shadow_failed")
DEFAULT_FLUSH_INTERVAL_S = 1.0
MAX_PENDING = 50_000  # keys held between flushes; beyond it the network thread flushes
PRUNE_EVERY_S = 3600.0


@dataclass
class _Pending:
    window: ResultsWindow
    windows: int
    last_at: datetime


_Key = tuple[str, str, int, datetime]


class ResultsRecorder:
    """Counts and batches ``results`` windows for the accuracy table."""

    def __init__(self, db: Database, flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S) -> None:
        self._db = db
        self._interval = flush_interval_s
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one writer at a time, in key order
        self._pending: dict[_Key, _Pending] = {}
        self._shadow: dict[tuple[str, str], tuple[ShadowReport, int, datetime]] = {}
        self._counts = dict.fromkeys(OUTCOMES + SHADOW_OUTCOMES, 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pruned_at = -PRUNE_EVERY_S
        self.pruned = 0

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def record(self, device_id: str, payload: Any, at: datetime | None = None) -> bool:
        """Queue one ``results`` payload; False (and counted) when it is not a window."""
        at = at or utcnow()
        if isinstance(payload, dict) and payload.get("shadow") is not None:
            self._record_shadow(device_id, payload["shadow"], at)
        try:
            window = accuracy.parse_results(payload)
        except accuracy.ResultsError as err:
            log.warning("dropped results of %s from accuracy: %s", device_id[:64], err)
            with self._lock:
                self._counts["rejected"] += 1
            return False
        key = (device_id, window.model, window.release, bucket_of(at))
        with self._lock:
            pending = self._pending.get(key)
            if pending is None:
                self._pending[key] = _Pending(window, 1, at)
            else:
                pending.window = ResultsWindow(
                    window.model,
                    window.release,
                    accuracy.merge_counts(pending.window.class_counts, window.class_counts),
                    accuracy.merge_hist(pending.window.confidence_hist, window.confidence_hist),
                )
                pending.windows += 1
                pending.last_at = at
            full = len(self._pending) >= MAX_PENDING
            self._ensure_thread()
        if full:
            self.flush()
        return True

    def _ensure_thread(self) -> None:
        """Called with ``_lock`` held."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="edgefleet-accuracy", daemon=True
            )
            self._thread.start()

    def _record_shadow(self, device_id: str, block: Any, at: datetime) -> None:
        try:
            window = parse_window(block)
        except InvalidInputError as err:
            log.warning("dropped shadow results of %s: %s", device_id[:64], err)
            with self._lock:
                self._counts["shadow_rejected"] += 1
            return
        key = (window.rollout_id, device_id)
        with self._lock:
            held = self._shadow.get(key)
            report = ShadowReport.of(window)
            self._shadow[key] = (
                (report, 1, at) if held is None else (held[0].merge(report), held[1] + 1, at)
            )
            self._ensure_thread()

    def _flush_shadow(self) -> None:
        with self._lock:
            batch, self._shadow = self._shadow, {}
        if not batch:
            return
        outcomes = dict.fromkeys(SHADOW_OUTCOMES, 0)
        try:
            with self._db.session() as s:
                for (rollout_id, device_id), (report, windows, at) in sorted(batch.items()):
                    ok = shadow_store.record(
                        s, rollout_id, device_id, report, windows=windows, at=at
                    )
                    outcomes["shadow_stored" if ok else "shadow_not_assigned"] += windows
        except Exception:  # a database error must not stop the next flush
            log.exception("writing %d shadow results failed", len(batch))
            outcomes = dict.fromkeys(SHADOW_OUTCOMES, 0)
            outcomes["shadow_failed"] = sum(windows for _, windows, _ in batch.values())
        with self._lock:
            for outcome, n in outcomes.items():
                self._counts[outcome] += n

    def flush(self) -> None:
        """Write what is pending in one transaction; count each window's outcome."""
        with self._flush_lock:
            self._flush_shadow()
            with self._lock:
                batch, self._pending = self._pending, {}
            if not batch:
                return
            outcomes = dict.fromkeys(OUTCOMES, 0)
            try:
                with self._db.session() as s:
                    for key in sorted(batch):
                        item = batch[key]
                        known = record_results(s, key[0], item.window, item.last_at, item.windows)
                        outcomes["stored" if known else "unknown_device"] += item.windows
            except Exception:  # a database error must not stop the next flush
                log.exception("writing %d accuracy windows failed", len(batch))
                outcomes = dict.fromkeys(OUTCOMES, 0)
                outcomes["failed"] = sum(item.windows for item in batch.values())
            with self._lock:
                for outcome, n in outcomes.items():
                    self._counts[outcome] += n

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()
            if time.monotonic() - self._pruned_at >= PRUNE_EVERY_S:
                self._prune()

    def _prune(self) -> None:
        """Drop hours older than ``RETENTION`` (hourly; any replica may do it)."""
        self._pruned_at = time.monotonic()
        try:
            with self._db.session() as s:
                self.pruned += prune(s, utcnow() - RETENTION)
        except Exception:
            log.exception("pruning accuracy windows failed")

    def close(self) -> None:
        """Stop the flush thread and write what is pending."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        self.flush()

"""The rollout scheduler: a server thread that ticks every active rollout on an interval.

Each tick of each rollout runs in its own transaction under the rollout's
lock (``server.rollout_service.engine``), so any number of server processes
may run this loop against one PostgreSQL database: a replica that finds a
rollout locked skips it until its next round. All state lives in the
database, so a restarted server simply carries on.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime

from sqlalchemy.exc import SQLAlchemyError

from server.db import Database
from server.errors import ConfigError, ServerError
from server.rollout_service import DEFAULT_CONFIG, ServiceConfig, TickResult, tick_all

log = logging.getLogger(__name__)


class RolloutScheduler:
    """``start()`` the loop, ``stop()`` it; ``run_once()`` is one round, for tests and tools."""

    def __init__(
        self, db: Database, interval_s: float, config: ServiceConfig = DEFAULT_CONFIG
    ) -> None:
        if not interval_s > 0:
            raise ConfigError("the rollout tick interval must be positive")
        self.db = db
        self.interval_s = interval_s
        self.config = config
        self.rounds = 0
        self.last_round_s = 0.0
        self.ticks = 0  # rollout ticks that ran (not skipped for another replica's lock)
        self.tick_seconds = 0.0  # time spent in the rounds that ticked something
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="rollout-scheduler", daemon=True)
        self._thread.start()
        log.info("rollout scheduler ticking every %.3gs", self.interval_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("rollout scheduler did not stop within %.0fs", timeout_s)
            self._thread = None

    def wake(self) -> None:
        """Run the next round now (e.g. right after an operator started a rollout)."""
        self._wake.set()

    def run_once(self, now: datetime | None = None) -> list[TickResult]:
        started = time.perf_counter()
        results = tick_all(self.db, self.config, now)
        self.last_round_s = time.perf_counter() - started
        self.rounds += 1
        if results:
            self.ticks += len(results)
            self.tick_seconds += self.last_round_s
        return results

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.run_once()
            except (SQLAlchemyError, ServerError) as err:  # e.g. the database is away
                log.error("rollout scheduler round failed: %s", err)
            self._wake.wait(self.interval_s)
            self._wake.clear()

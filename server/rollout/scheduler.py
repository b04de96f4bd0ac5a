"""The rollout scheduler: a loop that ticks every active rollout on an interval.

Each tick of each rollout runs in its own transaction under the rollout's
lock (``server.rollout.service.engine``), so any number of server processes
may run this loop against one PostgreSQL database: a replica that finds a
rollout locked skips it until its next round. All state lives in the
database, so a restarted server simply carries on.

The loop runs as a thread of the server (``RolloutScheduler``), or in a process
of its own (``SchedulerProcess``) on PostgreSQL.

In the API process the scheduler thread shares one GIL with every request
thread: at thousands of check-ins a second a 60 ms tick took seconds of wall
time, and each tick stalled the requests. In its own process the tick has a
core's share to itself, and it keeps its rollouts' facts in memory
(``rollout.service.snapshot``) without another process's writes making them
stale. The engine is safe with any number of processes on one PostgreSQL
(row locks), which is what makes the split free. SQLite keeps the thread: its
rollout locks are process-wide locks.

The child exits when told, or on its own when the server process is gone
(SIGKILL included), so it never ticks for a server that no longer exists.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from server.db.tables import Database
from server.errors import ConfigError, ServerError
from server.rollout.service import DEFAULT_CONFIG, ServiceConfig, TickResult, tick_all

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


_POLL_S = 0.5  # how often the child looks for a stop request or a vanished parent


@dataclass(frozen=True)
class _Shared:
    db_url: str
    interval_s: float
    config: ServiceConfig
    level: str
    parent: int  # the server's pid: gone (re-parented) means stop
    stop: Any  # multiprocessing.Event
    wake: Any
    ticks: Any  # multiprocessing.Value("q")
    seconds: Any  # multiprocessing.Value("d")
    last_round: Any


def _run(sh: _Shared) -> None:
    # Ctrl-C, and a SIGTERM sent to the whole process group (systemd's default
    # KillMode=control-group, timeout(1)), go to the server, which stops us: dying
    # inside ``wake.wait()`` would leave the server's ``wake.set()`` waiting forever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=sh.level.upper(), format="%(levelname)s: rollout-scheduler: %(message)s"
    )
    db = Database(sh.db_url, pool_size=2)
    sched = RolloutScheduler(db, sh.interval_s, sh.config)
    parent, interval_s = sh.parent, sh.interval_s
    try:
        while not sh.stop.is_set() and os.getppid() == parent:
            try:
                sched.run_once()
            except (SQLAlchemyError, ServerError) as err:  # e.g. the database is away
                log.error("rollout scheduler round failed: %s", err)
            sh.ticks.value, sh.seconds.value = sched.ticks, sched.tick_seconds
            sh.last_round.value = sched.last_round_s
            waited = 0.0
            while waited < interval_s and not sh.stop.is_set() and os.getppid() == parent:
                step = min(_POLL_S, interval_s - waited)
                if sh.wake.wait(step):
                    sh.wake.clear()
                    break
                waited += step
    finally:
        db.dispose()


class SchedulerProcess:
    """Same face as ``RolloutScheduler`` (start, stop, wake, the tick counters)."""

    def __init__(
        self, db_url: str, interval_s: float, config: ServiceConfig, log_level: str = "info"
    ) -> None:
        self.interval_s = interval_s
        ctx = multiprocessing.get_context("spawn")  # no threads or sockets copied by fork
        self._shared = _Shared(
            db_url,
            interval_s,
            config,
            log_level,
            os.getpid(),
            ctx.Event(),
            ctx.Event(),
            ctx.Value("q", 0),
            ctx.Value("d", 0.0),
            ctx.Value("d", 0.0),
        )
        self._process = ctx.Process(
            target=_run,
            args=(self._shared,),
            name="rollout-scheduler",
            daemon=True,
        )

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def ticks(self) -> int:
        return int(self._shared.ticks.value)

    @property
    def tick_seconds(self) -> float:
        return float(self._shared.seconds.value)

    @property
    def last_round_s(self) -> float:
        return float(self._shared.last_round.value)

    def start(self) -> None:
        self._process.start()
        log.info("rollout scheduler in process %s, ticking every %.3gs", self.pid, self.interval_s)

    def wake(self) -> None:
        self._shared.wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._process.pid is None:
            return
        self._shared.stop.set()
        self._shared.wake.set()
        self._process.join(timeout_s)
        if self._process.is_alive():
            log.error("rollout scheduler process did not stop within %.0fs", timeout_s)
            self._process.kill()
            with contextlib.suppress(OSError):
                self._process.join(5)

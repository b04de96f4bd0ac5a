"""``--workers N``: N processes serve the HTTP API; everything else runs once, in the parent.

The process model, chosen for being the simplest that is correct:

- The parent (``edgefleet-server run``) binds the listening socket and starts
  every background service exactly as with one process: the embedded broker,
  the telemetry ingest and its rollup writer, the rollout scheduler, the TUF
  re-signing loop (and any other service ``server.app.start_server`` starts).
  It serves no HTTP itself; it supervises the workers.
- Each worker is a fresh interpreter (``spawn``, never ``fork``: the parent
  already runs threads) that inherits the socket and runs uvicorn on it with
  its own database pool and its own ``TufRepository`` view. The kernel spreads
  accepted connections over the workers.

So no election is needed: a service that must run once per server lives in the
parent, and several replicas behind a load balancer are the existing replica
story (row locks in the rollout engine, a unique ingest client id each).
Workers share state only through PostgreSQL and the artifact store; the TUF
repository's writes take a PostgreSQL advisory lock (``server.publish.repo_lock``).
SQLite is refused: it is one process's database.

A worker that dies (crash, OOM kill) is restarted; one that exits cleanly or on
SIGTERM/SIGINT was told to stop. Workers stop on their own when the parent is gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
import os
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from server.config import MqttEndpoint, ServerConfig
from server.errors import ServerError

log = logging.getLogger(__name__)

__all__ = ["WorkerPool", "WorkerSettings"]

_SUPERVISE_S = 0.5
# Exit codes of a worker that was told to stop: a clean exit, or uvicorn re-raising the
# SIGTERM/SIGINT it drained on (a terminal's Ctrl-C or systemd reach the whole group).
_TOLD_TO_STOP = (0, -signal.SIGTERM, -signal.SIGINT)


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs from the parent (sent over a pipe, never on a command line)."""

    config: ServerConfig
    operator_token: str
    viewer_token: str
    mqtt_public: MqttEndpoint


def _watch_parent(parent: int, server: Any) -> None:
    while os.getppid() == parent and not server.should_exit:
        time.sleep(_SUPERVISE_S)
    server.should_exit = True


def _report_ready(server: Any, index: int, ready: Any) -> None:
    while not server.started and not server.should_exit:
        time.sleep(0.02)
    if server.started:
        ready.put((index, os.getpid()))


def worker_main(settings: WorkerSettings, sock: socket.socket, index: int, ready: Any) -> None:
    """Entry point of one worker process: serve the API on the inherited socket."""
    import uvicorn  # noqa: PLC0415 - the child's imports, not the parent's

    from server.api import AppState, create_app  # noqa: PLC0415
    from server.app import open_or_create_repo, publish_lock  # noqa: PLC0415 - import cycle
    from server.db.tables import Database  # noqa: PLC0415

    cfg = settings.config
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s [worker {index}]: %(message)s",
    )
    assert cfg.db_url is not None
    db = Database(cfg.db_url, pool_size=cfg.http_threads)
    try:
        repo = open_or_create_repo(cfg, db)
        state = AppState(
            cfg, db, repo, settings.operator_token, settings.mqtt_public,
            publish_lock=publish_lock(cfg, db), viewer_token=settings.viewer_token,
        )  # fmt: skip
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(state),
                log_level=cfg.log_level,
                access_log=False,
                timeout_graceful_shutdown=5,
            )
        )
        parent = os.getppid()
        threading.Thread(target=_watch_parent, args=(parent, server), daemon=True).start()
        threading.Thread(target=_report_ready, args=(server, index, ready), daemon=True).start()
        server.run(sockets=[sock])
    finally:
        db.dispose()


class WorkerPool:
    """Starts, supervises and stops the HTTP worker processes of one server."""

    def __init__(self, settings: WorkerSettings, sock: socket.socket, count: int) -> None:
        if count < 2:
            raise ValueError("a worker pool has at least two workers")
        self.settings = settings
        self.sock = sock
        self.count = count
        self.restarts = 0
        self._ctx = multiprocessing.get_context("spawn")
        self._ready: Any = self._ctx.Queue()
        self._procs: list[multiprocessing.context.SpawnProcess] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._procs if p.pid is not None and p.is_alive()]

    def _spawn(self, index: int) -> multiprocessing.context.SpawnProcess:
        proc = self._ctx.Process(
            target=worker_main,
            args=(self.settings, self.sock, index, self._ready),
            name=f"edgefleet-http-{index}",
            daemon=False,  # uvicorn may start its own helpers; daemons cannot
        )
        proc.start()
        log.info("HTTP worker %d started (pid %s)", index, proc.pid)
        return proc

    def start(self, timeout_s: float) -> None:
        """Start every worker and wait until each one serves; ServerError otherwise."""
        with self._lock:
            self._procs = [self._spawn(i) for i in range(self.count)]
        waiting = set(range(self.count))
        deadline = time.monotonic() + timeout_s
        while waiting:
            try:
                index, _pid = self._ready.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise ServerError(
                    f"HTTP workers {sorted(waiting)} did not start within {timeout_s:.0f} s"
                ) from None
            waiting.discard(index)
        self._supervisor = threading.Thread(
            target=self._supervise, name="http-workers", daemon=True
        )
        self._supervisor.start()

    def _supervise(self) -> None:
        while not self._stopping.wait(_SUPERVISE_S):
            with self._lock:
                for i, proc in enumerate(self._procs):
                    if proc.is_alive() or proc.exitcode in _TOLD_TO_STOP or self._stopping.is_set():
                        continue
                    log.error("HTTP worker %d (pid %s) died (%s); restarting", i, proc.pid,
                              proc.exitcode)  # fmt: skip
                    proc.join()
                    self._procs[i] = self._spawn(i)
                    self.restarts += 1

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every worker (uvicorn drains), then SIGKILL what is left."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        with self._lock:
            procs, self._procs = self._procs, []
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("HTTP worker pid %s ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.join(timeout=5)
        self._ready.close()

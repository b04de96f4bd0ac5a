"""Start and stop a whole fleet server in-process: keys, TUF repo, DB, broker, ingest, HTTP.

Telemetry goes broker -> ingest -> ``RollupWriter`` (batched, de-duplicated,
rolled up); ``/metrics`` reads the database and the writer's counters.

``start_server(config)`` returns a ``ServerHandle`` with the live URL and MQTT
port; tests, the demo and ``edgefleet-server run`` all use it. uvicorn (one
worker) runs on its own thread on a socket bound here, so port 0 works.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn

from server.api import AppState, create_app
from server.api.workers import WorkerPool, WorkerSettings
from server.config import MqttEndpoint, ServerConfig, ensure_operator_token, ensure_viewer_token
from server.db.queries import check_mqtt_password, new_secret
from server.db.tables import Database
from server.errors import ConfigError, ConflictError, ServerError
from server.mqtt.broker import (
    INTERNAL_USERNAME,
    BrokerTls,
    EmbeddedBroker,
    MqttAuthorizer,
    limits_from_config,
)
from server.mqtt.ingest import TelemetryIngest, ingest_protocol
from server.publish.artifact_store import open_store
from server.publish.delta_worker import DeltaWorker
from server.publish.keys import ROLES, init_keys, key_path
from server.publish.repo_lock import (
    PUBLISH_LOCK,
    TUF_REPO_LOCK,
    AdvisoryLock,
    FileLock,
    ProcessWideLock,
    RepoLock,
)
from server.publish.tuf_repo import TufRepository
from server.push.pacer import PushCollector, PushPacer
from server.rollout.scheduler import RolloutScheduler, SchedulerProcess
from server.rollout.service import ServiceConfig
from server.telemetry.metrics import FleetMetrics
from server.telemetry.writer import RollupConfig, RollupWriter

log = logging.getLogger(__name__)


def open_or_create_repo(config: ServerConfig, db: Database | None = None) -> TufRepository:
    """Keys and repository are created on first start and reused afterwards.

    On PostgreSQL, writes to the repository take an advisory lock (workers and
    replicas); otherwise an flock in the repository directory.
    """
    assert config.keys_dir is not None and config.repo_dir is not None
    store = open_store(config.artifact_store, config.repo_dir, config.s3_endpoint_url)
    lock = _cross_process_lock(config, db, TUF_REPO_LOCK, ".lock")
    if not any(key_path(config.keys_dir, role).exists() for role in ROLES):
        if TufRepository.exists(config.repo_dir, store):
            raise ConfigError(
                f"{store.describe()} holds a TUF repository but {config.keys_dir} has no "
                "keys; restore the keys rather than re-creating them"
            )
        init_keys(config.keys_dir)
    args = (config.repo_dir, config.keys_dir, None, store, lock)
    if TufRepository.exists(config.repo_dir, store):
        return TufRepository.open(*args)
    try:
        return TufRepository.create(*args)
    except ConflictError:  # another worker or replica created it first
        return TufRepository.open(*args)


def _cross_process_lock(cfg: ServerConfig, db: Database | None, key: int, name: str) -> RepoLock:
    """An advisory lock on PostgreSQL (workers, replicas), else an flock in the repo dir."""
    if db is not None and db.dialect == "postgresql":
        return AdvisoryLock(db.engine, key)
    assert cfg.repo_dir is not None
    return FileLock(cfg.repo_dir / name)


def publish_lock(cfg: ServerConfig, db: Database) -> ProcessWideLock:
    """Serialises whole publishes across this server's processes and replicas."""
    return ProcessWideLock(_cross_process_lock(cfg, db, PUBLISH_LOCK, ".publish.lock"))


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror}") from err
    return sock


@dataclass
class ServerHandle:
    """A running server. ``stop()`` is idempotent."""

    config: ServerConfig
    url: str
    operator_token: str
    db: Database
    repo: TufRepository
    ingest: TelemetryIngest
    broker: EmbeddedBroker | None
    mqtt_host: str
    mqtt_port: int
    _uvicorn: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _refresher: threading.Thread | None = None
    writer: RollupWriter | None = None
    metrics: FleetMetrics | None = None
    scheduler: RolloutScheduler | SchedulerProcess | None = None
    workers: WorkerPool | None = None  # --workers N: the HTTP processes (server.api.workers)
    pacer: PushPacer | None = None  # None: the server does not push (push_rate_per_s 0)
    delta_worker: DeltaWorker | None = None  # None: delta_workers 0

    def stop(self) -> None:
        self._stop.set()
        if self.pacer is not None:
            self.pacer.stop()  # before the ingest: it publishes through the ingest's client
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.delta_worker is not None:
            self.delta_worker.stop()  # a delta cut short is queued again
        if self.workers is not None:
            self.workers.stop()
        if self._uvicorn is not None and self._thread is not None:
            self._uvicorn.should_exit = True
            self._thread.join(timeout=15)
            self._uvicorn = None
        # Broker first: its drain hands accepted messages to the still-running ingest.
        if self.broker is not None:
            self.broker.stop()
        self.ingest.stop()
        if self.writer is not None:
            self.writer.stop()
        if self._refresher is not None:
            self._refresher.join(timeout=5)
            self._refresher = None
        self.db.dispose()
        log.info("fleet server stopped")

    def start_refresher(self) -> None:
        self._refresher = threading.Thread(
            target=self._refresh_loop, name="tuf-refresh", daemon=True
        )
        self._refresher.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.config.tuf_refresh_interval_s):
            try:
                self.repo.refresh()
            except ServerError as err:
                log.error("re-signing TUF metadata failed: %s", err)


def _start_mqtt(
    cfg: ServerConfig, db: Database
) -> tuple[EmbeddedBroker | None, MqttEndpoint, MqttEndpoint]:
    """(embedded broker or None, where ingest connects, what devices are told)."""
    external = cfg.mqtt_endpoint()
    if external is not None:
        public = MqttEndpoint(
            cfg.mqtt_public_host or external.host,
            cfg.mqtt_public_port or external.port,
            tls=cfg.mqtt_public_tls or external.tls,
        )
        return None, external, public
    internal_password = new_secret()

    def check_device(username: str, password: str) -> bool:
        with db.session() as s:
            return check_mqtt_password(s, username, password)

    tls = None
    if cfg.mqtt_tls_cert_file is not None and cfg.mqtt_tls_key_file is not None:
        tls = BrokerTls(cfg.mqtt_tls_cert_file, cfg.mqtt_tls_key_file)
    broker = EmbeddedBroker(
        cfg.mqtt_bind_host,
        cfg.mqtt_bind_port,
        MqttAuthorizer(internal_password, check_device),
        cfg.broker_max_connections,
        tls=tls,
        hold_devices_until_ingest=True,
        limits=limits_from_config(cfg),
    )
    port = broker.start(cfg.startup_timeout_s)
    host, ingest_port = broker.ingest_address
    endpoint = MqttEndpoint(host, ingest_port, INTERNAL_USERNAME, internal_password)
    public = MqttEndpoint(
        cfg.mqtt_public_host or cfg.mqtt_bind_host,
        cfg.mqtt_public_port or port,
        tls=cfg.mqtt_public_tls,
    )
    return broker, endpoint, public


def _start_http(
    cfg: ServerConfig, state: AppState, sock: socket.socket, metrics: FleetMetrics
) -> tuple[uvicorn.Server, threading.Thread]:
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(state, metrics=metrics),
            log_level=cfg.log_level,
            access_log=False,
            timeout_graceful_shutdown=5,
        )
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + cfg.startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ServerError(f"HTTP server did not start on {cfg.host}:{cfg.port}")
        time.sleep(0.02)
    return server, thread


def _stop_http(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(timeout=10)


def _display_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ipaddress.ip_address(host).is_unspecified:
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _scheduler(cfg: ServerConfig, db: Database) -> RolloutScheduler | SchedulerProcess:
    mode, postgres = cfg.rollout_scheduler, db.dialect == "postgresql"
    if mode == "process" and not postgres:
        raise ConfigError("rollout_scheduler=process needs PostgreSQL (SQLite locks are local)")
    service = ServiceConfig.from_server(cfg)
    if mode == "process" or (mode == "auto" and postgres):
        return SchedulerProcess(db.url, cfg.rollout_tick_interval_s, service, cfg.log_level)
    return RolloutScheduler(db, cfg.rollout_tick_interval_s, service)


def start_server(config: ServerConfig) -> ServerHandle:
    """Bring up every component; on any failure, stop what was started and re-raise."""
    cfg = config.resolve()
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    token = ensure_operator_token(cfg)
    assert cfg.db_url is not None
    with contextlib.ExitStack() as undo:  # on failure, stops what was started, newest first
        db = Database(cfg.db_url, pool_size=cfg.http_threads)
        undo.callback(db.dispose)
        repo = open_or_create_repo(cfg, db)
        scheduler = _scheduler(cfg, db)  # a bad choice fails before anything starts
        db.create_all()
        writer = RollupWriter(db, RollupConfig.from_server(cfg))
        writer.start()
        undo.callback(writer.stop)
        broker, endpoint, public = _start_mqtt(cfg, db)
        if broker is not None:
            undo.callback(broker.stop)
        ingest = TelemetryIngest(
            db,
            endpoint,
            cfg.ingest_client_id,
            cfg.max_telemetry_bytes,
            cfg.mqtt_keepalive_s,
            sink=writer,
            on_subscribed=broker.ingest_ready if broker is not None else None,
            manual_ack=broker is None and cfg.ingest_ack_after_commit,  # see server.mqtt.ingest
            share_group=cfg.ingest_share_group,
            protocol=ingest_protocol(cfg.ingest_mqtt_version, external=broker is None),
        )
        undo.callback(ingest.stop)
        ingest.start(cfg.startup_timeout_s)
        metrics = FleetMetrics(db, cfg, writer=writer, ingest=ingest)
        pacer = None
        if cfg.push_rate_per_s > 0:
            pacer = PushPacer(
                db, ingest.publish_command, cfg.push_rate_per_s, connected=lambda: ingest.connected
            )
            pacer.start()
            undo.callback(pacer.stop)
            metrics.registry.register(PushCollector(pacer))
        sock = _bind(cfg.host, cfg.port)
        undo.callback(sock.close)
        pool, server, thread = None, None, None
        if cfg.workers > 1:  # N processes serve HTTP; this one runs the services once
            viewer = ensure_viewer_token(cfg, token)
            pool = WorkerPool(WorkerSettings(cfg, token, viewer, public), sock, cfg.workers)
            pool.start(cfg.startup_timeout_s)
            undo.callback(pool.stop)
        else:
            state = AppState(cfg, db, repo, token, public, publish_lock(cfg, db))
            server, thread = _start_http(cfg, state, sock, metrics)
            undo.callback(_stop_http, server, thread)
        handle = ServerHandle(
            config=cfg,
            url=_display_url(sock),
            operator_token=token,
            db=db,
            repo=repo,
            ingest=ingest,
            broker=broker,
            mqtt_host=public.host,
            mqtt_port=public.port,
            _uvicorn=server,
            _thread=thread,
            writer=writer,
            metrics=metrics,
            pacer=pacer,
            workers=pool,
        )
        handle.scheduler = scheduler
        metrics.add_scheduler(scheduler)
        scheduler.start()
        if cfg.delta_workers > 0:  # beside the scheduler: once per server, not per HTTP worker
            handle.delta_worker = DeltaWorker(db, repo, cfg.delta_workers)
            handle.delta_worker.start()
        handle.start_refresher()
        undo.pop_all()  # started: from here on the handle's stop() owns every part
    log.info("fleet server API at %s (MQTT %s:%s)", handle.url, public.host, public.port)
    return handle

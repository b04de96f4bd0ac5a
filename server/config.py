"""Server configuration: one dataclass holding every path, address and limit.

``ServerConfig`` is plain data; ``resolve`` fills the defaults that derive from
the data directory, and ``ensure_operator_token`` is the one piece of IO here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from agent.common.atomic import atomic_write
from server.errors import ConfigError

log = logging.getLogger(__name__)

OPERATOR_TOKEN_ENV = "EDGEFLEET_OPERATOR_TOKEN"  # noqa: S105 - a variable name, not a secret
OPERATOR_TOKEN_FILE = "operator.token"  # noqa: S105
# A read-only token for the console and the REST GET routes: it can look, not act.
VIEWER_TOKEN_ENV = "EDGEFLEET_VIEWER_TOKEN"  # noqa: S105 - a variable name, not a secret
VIEWER_TOKEN_FILE = "viewer.token"  # noqa: S105
ROLLOUT_TICK_ENV = "EDGEFLEET_ROLLOUT_TICK_S"
METRICS_TOKEN_ENV = "EDGEFLEET_METRICS_TOKEN"  # noqa: S105 - a variable name, not a secret
_MIN_TOKEN_CHARS = 16
_MAX_MQTT_PACKET = 268_435_460  # MQTT's largest remaining length plus a 5-byte fixed header
POLL_INTERVAL_S = 30.0  # devices poll this often when the server does not push
PUSH_POLL_INTERVAL_S = 900.0  # with pushes, polling is the fallback (Mender: 30 min)
# A push makes a device check in at once. 250/s is about a seventh of what one server
# process answers (~1,700 check-ins/s) and of the embedded broker's QoS 1 rate (~1,400/s),
# leaving room for the steady load, and tells a 65,000-device stage in about 4.3 min.
DEFAULT_PUSH_RATE_PER_S = 250.0


@dataclass(frozen=True)
class MqttEndpoint:
    """Where an MQTT broker listens and how to log in to it."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None  # CA bundle for TLS; None: the system's trust store


def parse_mqtt_url(url: str) -> MqttEndpoint:
    """Parse ``mqtt://[user:pass@]host[:port]`` (``mqtts://`` for TLS)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(f"MQTT URL {url!r} must start with mqtt:// or mqtts://")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port
    except ValueError as err:
        raise ConfigError(f"MQTT URL {url!r} has an invalid port") from err
    if not parts.hostname:
        raise ConfigError(f"MQTT URL {url!r} has no host")
    return MqttEndpoint(
        host=parts.hostname,
        port=port if port is not None else (8883 if tls else 1883),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls,
    )


def normalize_db_url(url: str) -> str:
    """Use the psycopg 3 driver for every PostgreSQL URL."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if url.startswith(("sqlite:", "postgresql+psycopg:")):
        return url
    scheme = url.split(":", 1)[0]
    raise ConfigError(f"unsupported database URL {scheme!r}: use sqlite or postgresql")


def _rollout_tick_default() -> float:
    raw = os.environ.get(ROLLOUT_TICK_ENV)
    try:
        return float(raw) if raw else 5.0
    except ValueError as err:
        raise ConfigError(f"${ROLLOUT_TICK_ENV} {raw!r} is not a number of seconds") from err


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server process needs; paths default to under ``data_dir``."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    db_url: str | None = None
    mqtt_url: str | None = None  # None: run the embedded broker
    mqtt_bind_host: str = "127.0.0.1"
    mqtt_bind_port: int = 0  # 0: pick a free port; never assume 1883 is free
    mqtt_public_host: str | None = None  # what devices are told; default: the broker's address
    mqtt_public_port: int | None = None
    mqtt_public_tls: bool = False
    operator_token: str | None = None
    viewer_token: str | None = None  # None: $EDGEFLEET_VIEWER_TOKEN, else viewer.token
    enrollment_tokens: tuple[str, ...] = ()
    # What the check-in answer tells devices. 0: automatic, PUSH_POLL_INTERVAL_S while the
    # server pushes (polling is then only the fallback), else POLL_INTERVAL_S.
    poll_interval_s: float = 0.0
    # Check-in commands pushed over MQTT per second (server.push.pacer); 0: no pushes.
    push_rate_per_s: float = DEFAULT_PUSH_RATE_PER_S
    # Request threads, and as many pooled database connections: a request never waits
    # for a connection, and none is opened and closed per request under load.
    http_threads: int = 16
    keys_dir: Path | None = None
    repo_dir: Path | None = None
    tuf_refresh_interval_s: float = 3600.0  # re-sign TUF roles before they expire
    # Scale-out (server.api.workers): HTTP worker processes (more than 1 needs PostgreSQL);
    # where TUF metadata and targets are stored (None: repo_dir; a directory; or
    # s3://bucket/prefix, endpoint from s3_endpoint_url or $AWS_ENDPOINT_URL); and the
    # base URL devices fetch them from (a CDN, the bucket's URL; None: this server).
    workers: int = 1
    # Delta builds at a time (server.publish.delta_worker); 0: this server builds none.
    delta_workers: int = 1
    artifact_store: str | None = None
    s3_endpoint_url: str | None = None
    targets_url: str | None = None
    # Limits
    max_upload_bytes: int = 256 * 1024 * 1024
    max_json_bytes: int = 256 * 1024
    max_telemetry_bytes: int = 64 * 1024
    max_labels: int = 10_000
    max_tags: int = 32
    recent_events: int = 20
    list_limit: int = 10_000
    broker_max_connections: int = 100_000
    # Largest MQTT packet (fixed header included, as Mosquitto's max_packet_size counts
    # it): a client sending more is disconnected before the packet is read. Must leave
    # room for max_telemetry_bytes plus topic and headers.
    mqtt_max_packet_bytes: int = 256 * 1024
    # Embedded broker: messages a session may hold (queued + in flight). The ingest's
    # session never drops: at this limit devices' publishes wait (they keep them in
    # their outboxes); a device's cmd queue drops the newest instead.
    broker_max_queued_messages: int = 10_000
    broker_max_inflight_messages: int = 64  # unacknowledged QoS 1 deliveries per client
    ingest_client_id: str = "edgefleet-server-ingest"
    # Several ingest processes (each with its own ingest_client_id) share the device
    # stream through "$share/<group>/..." (Mosquitto 2, EMQX, the embedded broker).
    ingest_share_group: str | None = None
    # "auto": MQTT 5 on an external broker (subscribes with "do not send retained"),
    # 3.1.1 on the embedded one (which never replays retained messages to the ingest).
    ingest_mqtt_version: str = "auto"
    mqtt_keepalive_s: int = 30
    startup_timeout_s: float = 20.0
    log_level: str = "info"
    # Telemetry rollups, retention and metrics
    rollup_bucket_s: int = 60
    telemetry_retention_days: float = 30.0
    rollup_flush_interval_s: float = 0.2  # a batch is written after this long...
    rollup_flush_max_messages: int = 500  # ...or once this many messages are queued
    # ...or when the stream pauses this long: a broker that caps unacknowledged
    # deliveries (Mosquitto: max_inflight_messages 20) then waits for our commit.
    rollup_flush_idle_s: float = 0.005
    # External broker only: PUBACK a message after its batch commits, not on queueing,
    # so a server crash loses nothing. Needs a broker that never drops what waits for
    # the ingest (Mosquitto: max_queued_messages 0); default Mosquitto drops beyond 1000.
    ingest_ack_after_commit: bool = False
    ingest_queue_max: int = 20_000  # beyond this the MQTT thread waits (back-pressure)
    retention_prune_interval_s: float = 3600.0
    max_clock_skew_s: float = 300.0  # a device timestamp further ahead uses the receive time
    # Seen within this long and not "offline" = online (see presence_window_s).
    online_window_s: float = 120.0
    metrics_window_s: float = 120.0  # the gauges summarise this much recent telemetry
    metrics_cache_s: float = 5.0  # scrapes closer together reuse the last answer
    metrics_token: str | None = None  # a read-only bearer token for Prometheus
    # TLS: the embedded broker's device listener, and the CA the ingest trusts
    mqtt_tls_cert_file: Path | None = None
    mqtt_tls_key_file: Path | None = None
    mqtt_ca_file: Path | None = None
    # Rollouts: how often the scheduler ticks (also $EDGEFLEET_ROLLOUT_TICK_S)
    rollout_tick_interval_s: float = dataclasses.field(default_factory=_rollout_tick_default)
    # "process": the scheduler in a process of its own (PostgreSQL only; see
    # server.rollout.scheduler); "thread": in this process; "auto": process on PostgreSQL.
    rollout_scheduler: str = "auto"
    # Rate limits (token buckets, server.api.rate_limit); a rate of 0 turns one off. They
    # are per server process: N replicas admit up to N times as much. Generous on purpose:
    # they stop floods and runaway devices; a site enrolling hundreds of cameras with one
    # token, or a device polling every 0.3 s, must never trip them.
    enroll_rate_per_s: float = 5.0  # per enrollment token
    enroll_burst: int = 1000
    checkin_rate_per_s: float = 5.0  # per device (token)
    checkin_burst: int = 30
    rate_limit_keys: int = 200_000  # buckets kept per limiter (LRU): the fleet plus headroom

    @property
    def token_file(self) -> Path:
        return self.data_dir / OPERATOR_TOKEN_FILE

    @property
    def viewer_token_file(self) -> Path:
        return self.data_dir / VIEWER_TOKEN_FILE

    @property
    def upload_dir(self) -> Path:
        return self.data_dir / "uploads"

    def resolve(self) -> ServerConfig:
        """Fill defaults derived from ``data_dir`` and check the values."""
        data = Path(self.data_dir).expanduser().resolve()
        db_url = normalize_db_url(self.db_url or f"sqlite:///{data / 'edgefleet.db'}")
        if self.mqtt_url is not None:
            parse_mqtt_url(self.mqtt_url)  # fail at start, not at first connect
        for name in ("port", "mqtt_bind_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ConfigError(f"{name} {value} is not a TCP port")
        if not self.rollout_tick_interval_s > 0:
            raise ConfigError("rollout_tick_interval_s must be positive")
        if not self.poll_interval_s >= 0 or not self.push_rate_per_s >= 0:
            raise ConfigError("poll_interval_s and push_rate_per_s must not be negative")
        poll = self.poll_interval_s or (
            PUSH_POLL_INTERVAL_S if self.push_rate_per_s > 0 else POLL_INTERVAL_S
        )
        _check_scale_out(self, db_url)
        if self.rollout_scheduler not in ("auto", "thread", "process"):
            raise ConfigError("rollout_scheduler must be auto, thread or process")
        if not 1 <= self.http_threads <= 256:
            raise ConfigError("http_threads must be within 1..256")
        for name in ("max_upload_bytes", "max_json_bytes", "max_telemetry_bytes"):
            if getattr(self, name) < 1024:
                raise ConfigError(f"{name} must be at least 1024")
        self._check_telemetry_limits()
        self._check_mqtt_limits()
        cert, key, ca = _check_tls_files(self)
        return dataclasses.replace(
            self,
            data_dir=data,
            db_url=db_url,
            poll_interval_s=poll,
            mqtt_public_tls=self.mqtt_public_tls or self.mqtt_tls_cert_file is not None,
            metrics_token=_check_metrics_token(
                self.metrics_token or os.environ.get(METRICS_TOKEN_ENV)
            ),
            mqtt_tls_cert_file=cert,
            mqtt_tls_key_file=key,
            mqtt_ca_file=ca,
            keys_dir=Path(self.keys_dir).resolve() if self.keys_dir else data / "keys",
            repo_dir=Path(self.repo_dir).resolve() if self.repo_dir else data / "repo",
        )

    def _check_telemetry_limits(self) -> None:
        if not 1 <= self.rollup_bucket_s <= 3600:
            raise ConfigError("rollup_bucket_s must be between 1 and 3600")
        if self.telemetry_retention_days <= 0:
            raise ConfigError("telemetry_retention_days must be positive")
        if self.rollup_flush_max_messages < 1 or self.ingest_queue_max < 1:
            raise ConfigError("rollup_flush_max_messages and ingest_queue_max must be >= 1")
        for name in (
            "rollup_flush_interval_s",
            "rollup_flush_idle_s",
            "retention_prune_interval_s",
            "online_window_s",
            "metrics_window_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.max_clock_skew_s < 0 or self.metrics_cache_s < 0:
            raise ConfigError("max_clock_skew_s and metrics_cache_s must not be negative")

    def _check_mqtt_limits(self) -> None:
        if not self.max_telemetry_bytes + 1024 <= self.mqtt_max_packet_bytes <= _MAX_MQTT_PACKET:
            raise ConfigError(
                f"mqtt_max_packet_bytes must be between max_telemetry_bytes + 1024 "
                f"({self.max_telemetry_bytes + 1024}) and {_MAX_MQTT_PACKET}"
            )
        if self.broker_max_queued_messages < 1:
            raise ConfigError("broker_max_queued_messages must be >= 1")
        if not 1 <= self.broker_max_inflight_messages <= 65_535:
            raise ConfigError("broker_max_inflight_messages must be within 1..65535")
        group = self.ingest_share_group
        if group is not None and (not group or any(c in group for c in "/+#")):
            raise ConfigError("ingest_share_group must be a non-empty name without / + #")
        if self.ingest_mqtt_version not in ("auto", "3.1.1", "5"):
            raise ConfigError("ingest_mqtt_version must be auto, 3.1.1 or 5")

    @property
    def presence_window_s(self) -> float:
        """How long after it was last seen a device still counts as online.

        A device's telemetry windows (every 10 s) refresh ``last_seen`` as check-ins do,
        and its MQTT will marks it offline at once. Check-ins alone set the floor only
        when they are the devices' sole contact, i.e. when the server does not push:
        with pushes a quarter-hour poll would keep a dead camera "online" for 45 min.
        """
        if self.push_rate_per_s > 0:
            return self.online_window_s
        return max(self.online_window_s, 3 * self.poll_interval_s)

    def mqtt_endpoint(self) -> MqttEndpoint | None:
        if not self.mqtt_url:
            return None
        endpoint = parse_mqtt_url(self.mqtt_url)
        if self.mqtt_ca_file is not None:
            endpoint = dataclasses.replace(endpoint, ca_file=str(self.mqtt_ca_file))
        return endpoint


def _check_scale_out(cfg: ServerConfig, db_url: str) -> None:
    if not 1 <= cfg.workers <= 64:
        raise ConfigError("workers must be within 1..64")
    if not 0 <= cfg.delta_workers <= 16:
        raise ConfigError("delta_workers must be within 0..16")
    if cfg.workers > 1 and not db_url.startswith("postgresql"):
        raise ConfigError(
            f"--workers {cfg.workers} needs PostgreSQL (--db-url postgresql://...): "
            "SQLite is one process's database"
        )
    if cfg.targets_url is not None and not cfg.targets_url.startswith(("http://", "https://")):
        raise ConfigError(f"targets URL {cfg.targets_url!r} must be an http(s) URL")


def _check_metrics_token(token: str | None) -> str | None:
    if token is not None and len(token) < _MIN_TOKEN_CHARS:
        raise ConfigError(f"metrics token must be at least {_MIN_TOKEN_CHARS} characters")
    return token


def _check_tls_files(cfg: ServerConfig) -> tuple[Path | None, Path | None, Path | None]:
    """Resolved TLS paths; a certificate needs its key, and every named file must exist."""
    if (cfg.mqtt_tls_cert_file is None) != (cfg.mqtt_tls_key_file is None):
        raise ConfigError("the MQTT TLS certificate and key must be given together")
    if cfg.mqtt_tls_cert_file is not None and cfg.mqtt_url is not None:
        raise ConfigError("MQTT TLS certificate/key are for the embedded broker, not with mqtt_url")
    out: list[Path | None] = []
    for name in ("mqtt_tls_cert_file", "mqtt_tls_key_file", "mqtt_ca_file"):
        value = getattr(cfg, name)
        if value is not None:
            value = Path(value).expanduser().resolve()
            if not value.is_file():
                raise ConfigError(f"{name} {value} is not a readable file")
        out.append(value)
    return out[0], out[1], out[2]


def ensure_operator_token(config: ServerConfig) -> str:
    """The operator token: explicit, from the environment, or generated once to a 0600 file."""
    explicit = config.operator_token or os.environ.get(OPERATOR_TOKEN_ENV)
    return _ensure_token("operator", explicit, config.token_file)


def ensure_viewer_token(config: ServerConfig, operator_token: str) -> str:
    """The viewer token, found or generated like the operator token; it must differ from it."""
    explicit = config.viewer_token or os.environ.get(VIEWER_TOKEN_ENV)
    token = _ensure_token("viewer", explicit, config.viewer_token_file)
    if secrets.compare_digest(token.encode(), operator_token.encode()):
        raise ConfigError("the viewer token must differ from the operator token")
    return token


def _ensure_token(role: str, explicit: str | None, path: Path) -> str:
    if explicit:
        if len(explicit) < _MIN_TOKEN_CHARS:
            raise ConfigError(f"{role} token must be at least {_MIN_TOKEN_CHARS} characters")
        return explicit
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"{path} must not be readable by group or others (chmod 600)")
        token = path.read_text(encoding="utf-8").strip()
        if len(token) < _MIN_TOKEN_CHARS:
            raise ConfigError(f"{path} holds no usable {role} token")
        return token
    token = secrets.token_urlsafe(32)
    atomic_write(path, token.encode() + b"\n", mode=0o600)
    log.info("generated a new %s token in %s", role, path)
    return token

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
    poll_interval_s: float = 30.0
    # Request threads, and as many pooled database connections: a request never waits
    # for a connection, and none is opened and closed per request under load.
    http_threads: int = 16
    keys_dir: Path | None = None
    repo_dir: Path | None = None
    tuf_refresh_interval_s: float = 3600.0  # re-sign TUF roles before they expire
    # Limits
    max_upload_bytes: int = 256 * 1024 * 1024
    max_json_bytes: int = 256 * 1024
    max_telemetry_bytes: int = 64 * 1024
    max_labels: int = 10_000
    max_tags: int = 32
    recent_events: int = 20
    list_limit: int = 10_000
    broker_max_connections: int = 100_000
    ingest_client_id: str = "edgefleet-server-ingest"
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
    # Seen within this long (at least 3 check-in intervals) and not "offline" = online.
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
        if self.poll_interval_s <= 0:
            raise ConfigError("poll_interval_s must be positive")
        if self.rollout_scheduler not in ("auto", "thread", "process"):
            raise ConfigError("rollout_scheduler must be auto, thread or process")
        if not 1 <= self.http_threads <= 256:
            raise ConfigError("http_threads must be within 1..256")
        for name in ("max_upload_bytes", "max_json_bytes", "max_telemetry_bytes"):
            if getattr(self, name) < 1024:
                raise ConfigError(f"{name} must be at least 1024")
        self._check_telemetry_limits()
        cert, key, ca = _check_tls_files(self)
        return dataclasses.replace(
            self,
            data_dir=data,
            db_url=db_url,
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

    def mqtt_endpoint(self) -> MqttEndpoint | None:
        if not self.mqtt_url:
            return None
        endpoint = parse_mqtt_url(self.mqtt_url)
        if self.mqtt_ca_file is not None:
            endpoint = dataclasses.replace(endpoint, ca_file=str(self.mqtt_ca_file))
        return endpoint


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

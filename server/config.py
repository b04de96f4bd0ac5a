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

from agent.atomic import atomic_write
from server.errors import ConfigError

log = logging.getLogger(__name__)

OPERATOR_TOKEN_ENV = "EDGEFLEET_OPERATOR_TOKEN"  # noqa: S105 - a variable name, not a secret
OPERATOR_TOKEN_FILE = "operator.token"  # noqa: S105
_MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class MqttEndpoint:
    """Where an MQTT broker listens and how to log in to it."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False


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
    enrollment_tokens: tuple[str, ...] = ()
    poll_interval_s: float = 30.0
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

    @property
    def token_file(self) -> Path:
        return self.data_dir / OPERATOR_TOKEN_FILE

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
        if self.poll_interval_s <= 0:
            raise ConfigError("poll_interval_s must be positive")
        for name in ("max_upload_bytes", "max_json_bytes", "max_telemetry_bytes"):
            if getattr(self, name) < 1024:
                raise ConfigError(f"{name} must be at least 1024")
        return dataclasses.replace(
            self,
            data_dir=data,
            db_url=db_url,
            keys_dir=Path(self.keys_dir).resolve() if self.keys_dir else data / "keys",
            repo_dir=Path(self.repo_dir).resolve() if self.repo_dir else data / "repo",
        )

    def mqtt_endpoint(self) -> MqttEndpoint | None:
        return parse_mqtt_url(self.mqtt_url) if self.mqtt_url else None


def ensure_operator_token(config: ServerConfig) -> str:
    """The operator token: explicit, from the environment, or generated once to a 0600 file."""
    token = config.operator_token or os.environ.get(OPERATOR_TOKEN_ENV)
    if token:
        if len(token) < _MIN_TOKEN_CHARS:
            raise ConfigError(f"operator token must be at least {_MIN_TOKEN_CHARS} characters")
        return token
    path = config.token_file
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"{path} must not be readable by group or others (chmod 600)")
        token = path.read_text(encoding="utf-8").strip()
        if len(token) < _MIN_TOKEN_CHARS:
            raise ConfigError(f"{path} holds no usable operator token")
        return token
    token = secrets.token_urlsafe(32)
    atomic_write(path, token.encode() + b"\n", mode=0o600)
    log.info("generated a new operator token in %s", path)
    return token

"""Agent configuration: one TOML file, validated strictly, every limit in one place.

Unknown keys and wrong types are errors (a typo in a fleet-wide config must not
be silently ignored); the message names the file, the table and the key.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from agent.common.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 boards
    import tomli as tomllib


# The agent unit's StateDirectory=edgefleet (systemd/edgefleet-agent.service), so a config
# that `enroll` writes works unchanged under systemd.
DEFAULT_STATE_DIR = Path("/var/lib/edgefleet")
STATE_DIRECTORY_ENV = "STATE_DIRECTORY"  # set by systemd for a unit with StateDirectory=


def default_state_dir() -> Path:
    """Where a new configuration keeps the agent's state: systemd's choice, else the unit's."""
    env = os.environ.get(STATE_DIRECTORY_ENV, "")
    # systemd joins several directories with ':'; the agent's unit declares one.
    return Path(env.split(":")[0]) if env else DEFAULT_STATE_DIR


@dataclass(frozen=True)
class InferenceConfig:
    frames: str = "synthetic"
    top_k: int = 3
    max_fps: float = 0.0
    runtime: str = ""
    num_threads: int = 0


@dataclass(frozen=True)
class CameraConfig:
    """Live sources (v4l2:, rtsp://, http(s)://, file:); see agent.inference.capture."""

    stall_after_s: float = 10.0  # no frame for this long: the camera is in error, and reported
    read_timeout_s: float = 10.0  # the longest the inference thread waits for one frame
    open_timeout_s: float = 10.0
    backoff_max_s: float = 10.0  # reconnect backoff doubles from 0.5 s up to this
    rtsp_transport: str = "tcp"


@dataclass(frozen=True)
class TelemetryConfig:
    window_s: float = 10.0
    outbox_max_bytes: int = 16 * 1024 * 1024
    warmup_inferences: int = 5


@dataclass(frozen=True)
class UpdateConfig:
    poll_interval_s: float = 30.0
    health_inferences: int = 20
    max_model_bytes: int = 512 * 1024 * 1024
    download_retries: int = 5
    download_backoff_s: float = 0.5
    download_timeout_s: float = 30.0


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    server: str = ""
    profile: str = "auto"
    profiles_dir: str = ""
    hw_root: str = "/"
    log_level: str = "info"
    # CA bundle that signs the broker's certificate, when the server hands out mqtts.
    mqtt_ca_file: str = ""
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)

    @property
    def device_file(self) -> Path:
        return self.state_dir / "device.json"


_SECTIONS: dict[str, type] = {
    "inference": InferenceConfig,
    "camera": CameraConfig,
    "telemetry": TelemetryConfig,
    "update": UpdateConfig,
}
_LOG_LEVELS = ("debug", "info", "warning", "error")


def _coerce(where: str, key: str, value: Any, kind: Any) -> Any:
    if kind in ("float", float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = {"str": str, "int": int, "float": float, "Path": str}.get(str(kind))
    if expected is None or (isinstance(value, expected) and not isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: {key} must be {expected.__name__}, got {type(value).__name__}")


def _build(cls: type, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(known) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key in _SECTIONS:
            continue
        kwargs[key] = _coerce(where, key, value, known[key].type)
    return kwargs


def _check(cfg: AgentConfig, where: str) -> None:
    if cfg.log_level not in _LOG_LEVELS:
        raise ConfigError(f"{where}: log_level must be one of {', '.join(_LOG_LEVELS)}")
    if cfg.mqtt_ca_file and not Path(cfg.mqtt_ca_file).is_file():
        raise ConfigError(f"{where}: mqtt_ca_file {cfg.mqtt_ca_file} is not a readable file")
    if cfg.server and not cfg.server.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: server must be an http(s) URL")
    positives = {
        "telemetry.window_s": cfg.telemetry.window_s,
        "update.poll_interval_s": cfg.update.poll_interval_s,
        "update.max_model_bytes": cfg.update.max_model_bytes,
        "telemetry.outbox_max_bytes": cfg.telemetry.outbox_max_bytes,
        "inference.top_k": cfg.inference.top_k,
        "camera.stall_after_s": cfg.camera.stall_after_s,
        "camera.read_timeout_s": cfg.camera.read_timeout_s,
        "camera.open_timeout_s": cfg.camera.open_timeout_s,
        "camera.backoff_max_s": cfg.camera.backoff_max_s,
    }
    for key, value in positives.items():
        if value <= 0:
            raise ConfigError(f"{where}: {key} must be positive")
    if cfg.inference.num_threads < 0 or cfg.inference.max_fps < 0:
        raise ConfigError(f"{where}: num_threads and max_fps must not be negative")
    if cfg.camera.rtsp_transport not in ("tcp", "udp"):
        raise ConfigError(f"{where}: camera.rtsp_transport must be tcp or udp")


def parse_config(
    data: dict[str, Any], where: str = "config", base: Path | None = None
) -> AgentConfig:
    top = _build(AgentConfig, data.get("agent", {}), f"{where} [agent]")
    extra = sorted(set(data) - {"agent", *_SECTIONS})
    if extra:
        raise ConfigError(f"{where}: unknown table(s) {', '.join(extra)}")
    if "state_dir" not in top:
        raise ConfigError(f"{where} [agent]: state_dir is required")
    state_dir = Path(top.pop("state_dir")).expanduser()
    if not state_dir.is_absolute() and base is not None:
        state_dir = base / state_dir
    sections = {
        name: cls(**_build(cls, data.get(name, {}), f"{where} [{name}]"))
        for name, cls in _SECTIONS.items()
    }
    cfg = AgentConfig(state_dir=state_dir, **top, **sections)
    _check(cfg, where)
    return cfg


def load_config(path: Path) -> AgentConfig:
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from err
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    return parse_config(data, str(path), Path(path).resolve().parent)


def render_config(cfg: AgentConfig) -> str:
    """A minimal TOML for ``cfg`` (written by ``enroll`` and the demo)."""
    lines = ["[agent]", f"state_dir = {json.dumps(str(cfg.state_dir))}"]
    for key in ("server", "profile", "profiles_dir", "hw_root", "log_level", "mqtt_ca_file"):
        lines.append(f"{key} = {json.dumps(getattr(cfg, key))}")
    for name in _SECTIONS:
        section = getattr(cfg, name)
        lines.append(f"\n[{name}]")
        for f in fields(section):
            value = getattr(section, f.name)
            lines.append(
                f"{f.name} = {json.dumps(value)}"
                if isinstance(value, str)
                else f"{f.name} = {value}"
            )
    return "\n".join(lines) + "\n"

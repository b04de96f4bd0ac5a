"""The device's identity on disk: credentials from enrollment and the pinned TUF root.

``device.json`` holds secrets (device token, MQTT password) and is written 0600.
The trusted root is pinned at provisioning: from a file the installer ships
(``--root``) or, failing that, from the enrollment answer (trust on first use,
logged as such).
"""

from __future__ import annotations

import json
import logging
import socket
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.common.atomic import atomic_write, atomic_write_json
from agent.common.errors import ConfigError
from agent.protocol.api import EnrollResponse, MqttCredentials

log = logging.getLogger(__name__)

DEVICE_FILE = "device.json"
ROOT_FILE = "trusted_root.json"


@dataclass(frozen=True)
class Identity:
    device_id: str
    device_token: str
    server: str
    mqtt: MqttCredentials
    profile: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Identity:
        try:
            return cls(
                device_id=data["device_id"],
                device_token=data["device_token"],
                server=data["server"],
                mqtt=MqttCredentials(**data["mqtt"]),
                profile=data["profile"],
            )
        except (KeyError, TypeError) as err:
            raise ConfigError(f"{DEVICE_FILE} is incomplete: {err}") from err


def save_enrollment(
    state_dir: Path, server: str, profile: str, reply: EnrollResponse, pinned_root: bytes | None
) -> Identity:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ident = Identity(reply.device_id, reply.device_token, server, reply.mqtt, profile)
    atomic_write_json(state_dir / DEVICE_FILE, ident.to_json(), mode=0o600)
    if pinned_root is None:
        log.warning("no root.json supplied; pinning the root the server sent (trust on first use)")
        pinned_root = json.dumps(reply.tuf_root).encode()
    atomic_write(state_dir / ROOT_FILE, pinned_root, mode=0o644)
    return ident


def load_identity(state_dir: Path) -> Identity:
    path = state_dir / DEVICE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path} not found: enroll first with `edgefleet-agent enroll --server URL --token T`"
        ) from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} unreadable: {err}") from err
    return Identity.from_json(data)


def pinned_root(state_dir: Path) -> bytes:
    try:
        return (state_dir / ROOT_FILE).read_bytes()
    except OSError as err:
        raise ConfigError(f"no pinned TUF root in {state_dir}: {err}") from err


def hardware_id(hw_root: Path) -> str:
    """A stable id for this board: its serial, else machine-id, else host + MAC."""
    for rel in ("proc/device-tree/serial-number", "etc/machine-id"):
        try:
            text = (hw_root / rel).read_text(errors="replace").strip("\x00 \n")
        except OSError:
            continue
        if text:
            return text[:128]
    return f"{socket.gethostname()}-{uuid.getnode():012x}"

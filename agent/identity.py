"""The device's identity on disk: credentials from enrollment and the pinned TUF root.

``device.json`` holds secrets (device token, MQTT password) and is written 0600.
The trusted root is pinned at provisioning: from a file the installer ships
(``--root``) or, failing that, from the enrollment answer (trust on first use,
logged as such).

Re-enrolling an enrolled device proves who it is with the device token already
in ``device.json`` (``existing_identity``); the server refuses a takeover
without it unless an operator approved one. Rotated credentials replace the
file in one atomic write: a crash leaves the old identity or the new one.
"""

from __future__ import annotations

import json
import logging
import socket
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from agent.common.atomic import atomic_write, atomic_write_json
from agent.common.errors import ConfigError, ProtocolError
from agent.protocol.api import CredentialsResponse, EnrollResponse, MqttCredentials

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
    tuf_url: str | None = None  # TUF metadata/targets base URL, when not the server

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
                tuf_url=data.get("tuf_url"),
            )
        except (KeyError, TypeError) as err:
            raise ConfigError(f"{DEVICE_FILE} is incomplete: {err}") from err


def save_enrollment(
    state_dir: Path, server: str, profile: str, reply: EnrollResponse, pinned_root: bytes | None
) -> Identity:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ident = Identity(
        reply.device_id, reply.device_token, server, reply.mqtt, profile, reply.tuf_url
    )
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


def existing_identity(state_dir: Path, server: str) -> Identity | None:
    """The identity already enrolled in ``state_dir`` with ``server``, if any: its device
    token is the proof a re-enrollment of this device presents."""
    try:
        ident = load_identity(state_dir)
    except ConfigError:
        return None
    return ident if ident.server.rstrip("/") == server.rstrip("/") else None


def save_rotated(state_dir: Path, ident: Identity, reply: CredentialsResponse) -> Identity:
    """Replace ``device.json`` with the rotated credentials (the old ones are dead already)."""
    if reply.device_id != ident.device_id:
        raise ProtocolError(
            f"the server rotated credentials for {reply.device_id}, not {ident.device_id}"
        )
    rotated = replace(ident, device_token=reply.device_token, mqtt=reply.mqtt)
    atomic_write_json(state_dir / DEVICE_FILE, rotated.to_json(), mode=0o600)
    return rotated


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

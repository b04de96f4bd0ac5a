"""MQTT topic layout: ``edgefleet/v1/devices/{device_id}/{channel}``."""

from __future__ import annotations

import re
from typing import Final

from agent.common.errors import ProtocolError

PREFIX: Final = "edgefleet/v1/devices"
CHANNELS: Final = ("telemetry", "events", "state", "results", "cmd")
QOS: Final = 1
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is safe to embed in a topic or path."""
    if not _DEVICE_ID.match(device_id):
        raise ProtocolError(f"invalid device id {device_id!r}")
    return device_id


def topic(device_id: str, channel: str) -> str:
    if channel not in CHANNELS:
        raise ProtocolError(f"unknown channel {channel!r}")
    return f"{PREFIX}/{check_device_id(device_id)}/{channel}"


def device_prefix(device_id: str) -> str:
    """Everything a device may publish lives under this prefix."""
    return f"{PREFIX}/{check_device_id(device_id)}/"


def parse(topic_name: str) -> tuple[str, str]:
    """Split a topic into ``(device_id, channel)``; raise on anything else."""
    parts = topic_name.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != PREFIX or parts[4] not in CHANNELS:
        raise ProtocolError(f"not an EdgeFleet device topic: {topic_name!r}")
    return check_device_id(parts[3]), parts[4]

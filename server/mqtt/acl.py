"""Mosquitto password and ACL files equivalent to the embedded broker's rules.

The database already keeps every device's MQTT password in Mosquitto's
``$7$`` (PBKDF2-SHA512) format, so an export moves a fleet to Mosquitto
without rotating a single credential. The rules match ``server.mqtt.broker``:

- a device may publish only to its own telemetry, events, state and results
  topics (not to its own ``cmd``: only the server commands a device), and
  may read only its own ``cmd``;
- the server's ingest user reads every device topic and writes commands.

Files are deterministic (sorted, no timestamp), so a cron job can compare a
fresh export with the live files and ``kill -HUP`` Mosquitto only on change.
The builders are pure; ``export_broker_files`` is the one database read.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.common.errors import ProtocolError
from agent.protocol import topics
from server.config import ServerConfig
from server.db.queries import mosquitto_hash
from server.db.tables import Device
from server.errors import ConfigError

DEFAULT_INGEST_USER = "edgefleet-server"
DEVICE_PUBLISH_CHANNELS = ("telemetry", "events", "state", "results")
_HASH = re.compile(r"^\$7\$[0-9]{1,7}\$[A-Za-z0-9+/]+={0,2}\$[A-Za-z0-9+/]+={0,2}$")
_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_SALT_BYTES = 12


@dataclass(frozen=True)
class BrokerFiles:
    passwd: str
    acl: str
    devices: int
    ingest_user: str
    warnings: tuple[str, ...]


def device_acl(device_id: str) -> list[str]:
    topics.check_device_id(device_id)
    lines = [f"user {device_id}"]
    lines += [f"topic write {topics.topic(device_id, c)}" for c in DEVICE_PUBLISH_CHANNELS]
    lines.append(f"topic read {topics.topic(device_id, 'cmd')}")
    return lines


def ingest_acl(username: str) -> list[str]:
    return [
        f"user {username}",
        f"topic read {topics.PREFIX}/+/+",
        f"topic write {topics.PREFIX}/+/cmd",
    ]


def ingest_password_hash(username: str, password: str) -> str:
    """A ``$7$`` hash with a salt derived from the credential, so re-exports are identical."""
    salt = hmac.new(password.encode(), f"edgefleet-mqtt:{username}".encode(), hashlib.sha256)
    return mosquitto_hash(password, salt.digest()[:_SALT_BYTES])


def build_files(
    devices: Iterable[tuple[str, str]], ingest_user: str, ingest_hash: str | None
) -> BrokerFiles:
    """Password and ACL file text from ``(device_id, $7$ hash)`` pairs (pure).

    A device row that cannot be written safely (an id that is not a valid
    topic segment, a hash that is not ``$7$``) is left out with a warning
    rather than breaking the whole file.
    """
    if not _USERNAME.match(ingest_user) or ":" in ingest_user:
        raise ConfigError(f"MQTT username {ingest_user[:80]!r} cannot go into a Mosquitto file")
    warnings: list[str] = []
    passwd: list[str] = []
    acl = [
        "# EdgeFleet Mosquitto ACL (edgefleet mqtt export-acl). Reload: kill -HUP <pid>.",
        "# The server's ingest: reads every device topic, sends commands.",
        *ingest_acl(ingest_user),
    ]
    if ingest_hash is not None:
        passwd.append(f"{ingest_user}:{ingest_hash}")
    else:
        warnings.append(
            f"no password for the ingest user {ingest_user!r} on this server; add it with "
            f"mosquitto_passwd and start the server with mqtt://{ingest_user}:PASSWORD@HOST"
        )
    exported = 0
    for device_id, stored_hash in sorted(devices):
        try:
            lines = device_acl(device_id)
        except ProtocolError:
            warnings.append(f"skipped device id {device_id[:80]!r}: not a valid MQTT username")
            continue
        if not _HASH.match(stored_hash):
            warnings.append(f"skipped {device_id}: its MQTT password hash is not in $7$ format")
            continue
        passwd.append(f"{device_id}:{stored_hash}")
        acl += ["", *lines]
        exported += 1
    return BrokerFiles(
        passwd="\n".join(passwd) + "\n",
        acl="\n".join(acl) + "\n",
        devices=exported,
        ingest_user=ingest_user,
        warnings=tuple(warnings),
    )


def export_broker_files(s: Session, config: ServerConfig) -> BrokerFiles:
    """Both files for every enrolled device; the ingest user comes from ``mqtt_url``."""
    endpoint = config.mqtt_endpoint()
    user = endpoint.username if endpoint and endpoint.username else DEFAULT_INGEST_USER
    password = endpoint.password if endpoint else None
    ingest_hash = ingest_password_hash(user, password) if password else None
    rows = s.execute(select(Device.id, Device.mqtt_password_hash).order_by(Device.id))
    return build_files(((r.id, r.mqtt_password_hash) for r in rows), user, ingest_hash)

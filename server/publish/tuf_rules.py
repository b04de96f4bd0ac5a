"""Pure rules of the TUF repository: role lifetimes, target names, custom fields.

No IO except reading a target's source file in chunks; ``server.publish.tuf_repo``
applies these to the store.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from tuf.api.metadata import TargetFile

from agent.protocol.custom_fields import TargetInfo, decode_custom, encode_custom
from server.errors import InvalidInputError
from server.publish.keys import ROLES

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_TARGET_PATH = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})*$")
_COPY_CHUNK = 1024 * 1024
Source = Path | bytes


@dataclass(frozen=True)
class ExpiryPolicy:
    """How long each role's signature is valid, and when to re-sign early.

    A role is re-signed by ``refresh()`` once less than ``refresh_fraction``
    of its lifetime remains, so devices never see it expire while the server
    runs. Short timestamp/snapshot lifetimes bound how long an attacker can
    freeze a device on stale metadata.
    """

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)
    refresh_fraction: float = 0.5

    def __post_init__(self) -> None:
        for role in ROLES:
            if self.lifetime(role) <= timedelta(0):
                raise ValueError(f"{role} expiry must be positive")
        if not 0.0 < self.refresh_fraction < 1.0:
            raise ValueError("refresh_fraction must be between 0 and 1")

    def lifetime(self, role: str) -> timedelta:
        value: timedelta = getattr(self, role)
        return value


def check_target_path(path: str) -> str:
    if not isinstance(path, str) or len(path) > 512 or not _TARGET_PATH.match(path):
        raise InvalidInputError(
            f"target path {path!r} must be relative segments of [A-Za-z0-9._-] "
            "each starting with a letter or digit"
        )
    return path


def stored_name(path: str, sha256: str) -> str:
    dirname, sep, basename = path.rpartition("/")
    return f"{dirname}{sep}{sha256}.{basename}"


def target_key(path: str, sha256: str) -> str:
    return "targets/" + stored_name(path, sha256)


def info_of(target: TargetFile) -> TargetInfo:
    custom = decode_custom(target.custom) if isinstance(target.custom, dict) else {}
    return TargetInfo(target.path, target.length, target.hashes["sha256"], custom)


def check_custom(custom: dict[str, Any]) -> dict[str, Any]:
    """Validate and encode for signing (canonical JSON has no floats)."""
    if not isinstance(custom, dict):
        raise InvalidInputError("target custom metadata must be a JSON object")
    try:
        data: dict[str, Any] = encode_custom(custom)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"target custom metadata is not plain JSON: {err}") from err
    return data


def with_dependents(roles: set[str]) -> set[str]:
    """A new targets needs a new snapshot, which needs a new timestamp."""
    roles = set(roles)
    if "targets" in roles:
        roles.add("snapshot")
    if "snapshot" in roles:
        roles.add("timestamp")
    return roles


def chunks(source: Source) -> Iterator[bytes]:
    if isinstance(source, bytes):
        yield source
        return
    try:
        with open(source, "rb") as handle:
            while chunk := handle.read(_COPY_CHUNK):
                yield chunk
    except OSError as err:
        raise InvalidInputError(f"cannot read target source {source}: {err}") from err

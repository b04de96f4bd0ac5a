"""Reading sysfs-style files under a configurable root, with clear errors.

Every reader takes a ``root`` (``/`` on a device, a fake board tree in tests),
so the parsing code that runs in tests is the code that runs in the field.
"""

from __future__ import annotations

import re
from pathlib import Path

from agent.common.errors import SensorError

_LEADING_NUMBER = re.compile(r"^(\D*)(\d+)")


def under(root: str | Path, rel: str) -> Path:
    """``rel`` (an absolute device path like ``/sys/class/hwmon``) re-rooted at ``root``."""
    return Path(root) / rel.lstrip("/")


def numeric_key(path: Path) -> tuple[str, int]:
    """Sort ``hwmon10`` after ``hwmon9``, ``thermal_zone10`` after ``thermal_zone9``."""
    match = _LEADING_NUMBER.match(path.name)
    return (match.group(1), int(match.group(2))) if match else (path.name, -1)


def read_text(path: Path, what: str) -> str:
    """The stripped text of ``path``; any failure is a ``SensorError`` naming it."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError as err:
        raise SensorError(f"{what}: {path} does not exist") from err
    except PermissionError as err:
        raise SensorError(f"{what}: {path} is not readable by this user") from err
    except UnicodeDecodeError as err:
        raise SensorError(f"{what}: {path} holds binary garbage, not text") from err
    except OSError as err:
        # Drivers return EIO/ENODATA/EINVAL from read() for disabled channels.
        raise SensorError(f"{what}: reading {path} failed: {err.strerror or err}") from err


def read_int(path: Path, what: str) -> int:
    text = read_text(path, what)
    try:
        return int(text)
    except ValueError as err:
        raise SensorError(f"{what}: {path} holds {text[:40]!r}, expected an integer") from err


def find_hwmon(root: str | Path, name: str) -> list[Path]:
    """Every ``/sys/class/hwmon/hwmon*`` directory whose ``name`` file equals ``name``."""
    found: list[Path] = []
    for device in sorted(under(root, "/sys/class/hwmon").glob("hwmon*"), key=numeric_key):
        try:
            if (device / "name").read_text(encoding="utf-8").strip() == name:
                found.append(device)
        except (OSError, UnicodeDecodeError):
            continue  # another driver's unreadable hwmon is not our problem
    return found

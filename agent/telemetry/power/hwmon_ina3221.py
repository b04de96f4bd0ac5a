"""``hwmon_ina3221``: Jetson JetPack 5+ INA3221 power monitors via hwmon.

Each channel K has ``in<K>_label``, ``in<K>_input`` (bus mV) and
``curr<K>_input`` (mA). The module input rail (``VDD_IN`` on Orin Nano/NX) is
the board total when present; AGX Orin has none, so its rails are summed. The
driver's "Sum of shunt voltages" channel and unconnected "NC" channels are
skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from agent.common.errors import SensorError
from agent.telemetry.power.base import SENSOR, PowerSample
from agent.telemetry.power.sysfs import find_hwmon, numeric_key, read_int, read_text

_LABEL_FILE = re.compile(r"^in(\d+)_label$")
_TOKENS = re.compile(r"[^A-Za-z0-9]+")


@dataclass(frozen=True)
class Rail:
    label: str
    mw: float


def is_skipped_label(label: str) -> bool:
    """True for the sum-of-shunts channel and for labels marking a channel unconnected."""
    if label.strip().lower().startswith("sum of shunt"):
        return True
    return "NC" in _TOKENS.split(label.upper())


def rail_total(rails: list[Rail], total_label: str, method: str) -> PowerSample:
    """The ``total_label`` rail when present, else the sum of all rails (pure)."""
    if not rails:
        raise SensorError(f"{method}: no usable rails found")
    by_rail = tuple((rail.label, rail.mw) for rail in rails)
    for rail in rails:
        if rail.label == total_label:
            return PowerSample(rail.mw, SENSOR, f"{method} {total_label}", by_rail)
    names = "+".join(rail.label for rail in rails)
    return PowerSample(sum(r.mw for r in rails), SENSOR, f"{method} sum({names})", by_rail)


def read_device_rails(device: Path) -> list[Rail]:
    """The labelled, connected rails of one ina3221 hwmon directory."""
    rails: list[Rail] = []
    for label_file in sorted(device.glob("in*_label"), key=numeric_key):
        match = _LABEL_FILE.match(label_file.name)
        if match is None:
            continue
        label = read_text(label_file, "hwmon_ina3221 label")
        if not label:
            raise SensorError(f"hwmon_ina3221: {label_file} is empty")
        if is_skipped_label(label):
            continue
        channel = match.group(1)
        mv = read_int(device / f"in{channel}_input", f"hwmon_ina3221 {label} voltage")
        ma = read_int(device / f"curr{channel}_input", f"hwmon_ina3221 {label} current")
        rails.append(Rail(label, mv * ma / 1000.0))
    return rails


class HwmonIna3221Reader:
    """Total board power from every hwmon device named ``ina3221`` under ``root``."""

    method = "hwmon_ina3221"

    def __init__(self, root: str | Path = "/", total_rail: str = "VDD_IN") -> None:
        self._root = Path(root)
        self._total_rail = total_rail

    def read(self) -> PowerSample:
        devices = find_hwmon(self._root, "ina3221")
        if not devices:
            raise SensorError(
                f"{self.method}: no hwmon named 'ina3221' under {self._root / 'sys/class/hwmon'}"
            )
        rails: list[Rail] = []
        for device in devices:
            rails.extend(read_device_rails(device))
        return rail_total(rails, self._total_rail, self.method)

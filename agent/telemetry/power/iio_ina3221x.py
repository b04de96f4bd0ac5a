"""``iio_ina3221x``: Jetson Nano/TX (JetPack 4) INA3221 monitors via IIO.

Each channel N has ``rail_name_<N>`` and ``in_power<N>_input`` (already mW).
``POM_5V_IN`` is the module input and therefore the board total; without it
the rails are summed.
"""

from __future__ import annotations

import re
from pathlib import Path

from agent.common.errors import SensorError
from agent.telemetry.power.base import PowerSample
from agent.telemetry.power.hwmon_ina3221 import Rail, is_skipped_label, rail_total
from agent.telemetry.power.sysfs import numeric_key, read_int, read_text, under

_RAIL_FILE = re.compile(r"^rail_name_(\d+)$")
DEVICES_GLOB = "sys/bus/i2c/drivers/ina3221x/*/iio:device*"


def read_iio_rails(device: Path) -> list[Rail]:
    rails: list[Rail] = []
    numbered = [(_RAIL_FILE.match(p.name), p) for p in device.glob("rail_name_*")]
    for match, name_file in sorted(
        ((m, p) for m, p in numbered if m is not None), key=lambda mp: int(mp[0].group(1))
    ):
        label = read_text(name_file, "iio_ina3221x rail name")
        if not label:
            raise SensorError(f"iio_ina3221x: {name_file} is empty")
        if is_skipped_label(label):
            continue
        mw = read_int(device / f"in_power{match.group(1)}_input", f"iio_ina3221x {label} power")
        rails.append(Rail(label, float(mw)))
    return rails


class IioIna3221xReader:
    """Total board power from every ``ina3221x`` IIO device under ``root``."""

    method = "iio_ina3221x"

    def __init__(self, root: str | Path = "/", total_rail: str = "POM_5V_IN") -> None:
        self._root = Path(root)
        self._total_rail = total_rail

    def read(self) -> PowerSample:
        devices = sorted(self._root.glob(DEVICES_GLOB), key=numeric_key)
        if not devices:
            where = under(self._root, DEVICES_GLOB)
            raise SensorError(f"{self.method}: no IIO device matches {where}")
        rails: list[Rail] = []
        for device in devices:
            rails.extend(read_iio_rails(device))
        return rail_total(rails, self._total_rail, self.method)

"""``rpi5_pmic``: Raspberry Pi 5 on-board rails from ``vcgencmd pmic_read_adc``.

The PMIC reports each rail's current (``NAME_A current(n)=...A``) and voltage
(``NAME_V volt(n)=...V``). Pairing them by name and summing V x A gives the
power of the rails the PMIC sees; that excludes USB peripherals and the 5 V
input conversion loss, so it is labelled on-board rails, not wall power.
"""

from __future__ import annotations

import re
from pathlib import Path

from agent.common.errors import SensorError
from agent.telemetry.power.base import SENSOR, PowerSample
from agent.telemetry.power.vcgencmd import run_vcgencmd

DETAIL = "rpi5_pmic (on-board rails)"
_LINE = re.compile(
    r"^\s*(?P<rail>\S+)_(?P<kind>[AV])\s+(?:current|volt)\(\d+\)="
    r"(?P<value>[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?P<unit>[AV])\s*$"
)


def parse_pmic_read_adc(text: str) -> dict[str, tuple[float, float]]:
    """Map rail name to ``(volts, amps)`` for every rail with both readings (pure).

    Rails with only a voltage (``EXT5V_V``, ``BATT_V``) are dropped; output with
    no complete pair at all is a ``SensorError`` quoting what was seen.
    """
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    unknown: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _LINE.match(line)
        if match is None or match.group("kind") != match.group("unit"):
            unknown.append(line.strip())
            continue
        table = amps if match.group("kind") == "A" else volts
        table[match.group("rail")] = float(match.group("value"))
    pairs = {rail: (volts[rail], amps[rail]) for rail in amps if rail in volts}
    if not pairs:
        seen = unknown[0][:80] if unknown else "empty output"
        raise SensorError(
            f"rpi5_pmic: no rail with both current and voltage in pmic_read_adc ({seen!r})"
        )
    return pairs


def pmic_sample(text: str) -> PowerSample:
    """The summed V x A of ``pmic_read_adc`` output, in mW (pure)."""
    pairs = parse_pmic_read_adc(text)
    rails = tuple((rail, v * a * 1000.0) for rail, (v, a) in sorted(pairs.items()))
    return PowerSample(sum(mw for _, mw in rails), SENSOR, DETAIL, rails)


class Rpi5PmicReader:
    method = "rpi5_pmic"

    def __init__(self, vcgencmd_path: str | Path = "vcgencmd", timeout_s: float = 2.0) -> None:
        self._path = str(vcgencmd_path)
        self._timeout_s = timeout_s

    def read(self) -> PowerSample:
        return pmic_sample(run_vcgencmd(self._path, ["pmic_read_adc"], self._timeout_s))

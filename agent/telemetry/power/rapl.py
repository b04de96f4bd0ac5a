"""``rapl``: Intel/AMD package energy from the powercap RAPL counter.

``energy_uj`` is a cumulative counter in microjoules that wraps at
``max_energy_range_uj``; mean power over an interval is the wrapped delta
divided by the elapsed time. Since Linux 5.10 the counter is root-only
(CVE-2020-8694), so the agent needs a udev rule or group read access.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from agent.common.errors import SensorError
from agent.telemetry.power.base import SENSOR, PowerSample
from agent.telemetry.power.sysfs import read_int, read_text, under

POWERCAP = "/sys/class/powercap"


def rapl_delta_uj(previous_uj: int, current_uj: int, max_range_uj: int) -> int:
    """Energy used between two counter readings, across at most one wrap (pure)."""
    if max_range_uj <= 0:
        raise SensorError(f"rapl: max_energy_range_uj is {max_range_uj}, expected > 0")
    for value in (previous_uj, current_uj):
        if not 0 <= value <= max_range_uj:
            raise SensorError(f"rapl: energy_uj {value} outside 0..{max_range_uj}")
    delta = current_uj - previous_uj
    return delta + max_range_uj if delta < 0 else delta


def mean_mw(delta_uj: int, seconds: float) -> float:
    """Microjoules over seconds is microwatts; return milliwatts (pure)."""
    if seconds <= 0:
        raise SensorError(f"rapl: non-positive interval {seconds}s between readings")
    return delta_uj / seconds / 1000.0


class RaplReader:
    """Mean power since the previous ``read()``; the first read primes over ``prime_s``."""

    method = "rapl"

    def __init__(
        self,
        root: str | Path = "/",
        zone: str = "intel-rapl:0",
        prime_s: float = 0.05,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._dir = under(root, f"{POWERCAP}/{zone}")
        self._zone = zone
        self._prime_s = prime_s
        self._clock = clock
        self._sleep = sleep
        self._max_range: int | None = None
        self._previous: tuple[int, float] | None = None
        self._last: PowerSample | None = None

    def _counter(self) -> tuple[int, float]:
        if self._max_range is None:
            self._max_range = read_int(self._dir / "max_energy_range_uj", "rapl max range")
        return read_int(self._dir / "energy_uj", "rapl energy"), self._clock()

    def _detail(self) -> str:
        try:
            name = read_text(self._dir / "name", "rapl zone name")
        except SensorError:
            name = ""
        return f"rapl {self._zone} {name}".strip()

    def read(self) -> PowerSample:
        if self._previous is None:
            self._previous = self._counter()
            self._sleep(self._prime_s)
        current = self._counter()
        previous, self._previous = self._previous, current
        assert self._max_range is not None  # set by _counter
        if current[1] <= previous[1]:
            if self._last is not None:
                return self._last  # read twice in one clock tick: nothing new to report
            raise SensorError(f"rapl: clock did not advance between readings of {self._dir}")
        delta = rapl_delta_uj(previous[0], current[0], self._max_range)
        self._last = PowerSample(mean_mw(delta, current[1] - previous[1]), SENSOR, self._detail())
        return self._last

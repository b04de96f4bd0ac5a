"""``estimate``: board power as a linear function of CPU utilisation.

``idle_w + (load_w - idle_w) x utilisation`` with the profile's measured
constants. It is a model, not a measurement, and is always labelled
``estimate``. Utilisation comes from our own ``cpu_times`` deltas so that other
callers of ``psutil.cpu_percent`` cannot reset our baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import psutil

from agent.common.errors import SensorError
from agent.telemetry.power.base import ESTIMATE, PowerSample


class CpuTimes(NamedTuple):
    busy_s: float
    total_s: float


def psutil_cpu_times() -> CpuTimes:
    """System-wide busy and total CPU seconds, counted the way psutil does."""
    times = psutil.cpu_times()
    total = float(sum(times))
    # guest time is already included in user/nice on Linux.
    total -= float(getattr(times, "guest", 0.0)) + float(getattr(times, "guest_nice", 0.0))
    idle = float(times.idle) + float(getattr(times, "iowait", 0.0))
    return CpuTimes(total - idle, total)


def utilisation(previous: CpuTimes, current: CpuTimes) -> float | None:
    """Busy fraction in [0, 1] between two readings, or None if no time passed (pure)."""
    total = current.total_s - previous.total_s
    if total <= 0:
        return None
    return min(1.0, max(0.0, (current.busy_s - previous.busy_s) / total))


def estimate_mw(idle_w: float, load_w: float, util: float) -> float:
    """``idle_w + (load_w - idle_w) x util`` in milliwatts (pure)."""
    if not 0.0 <= util <= 1.0:
        raise ValueError(f"CPU utilisation must be in [0, 1], got {util}")
    return (idle_w + (load_w - idle_w) * util) * 1000.0


class EstimateReader:
    method = "estimate"

    def __init__(
        self,
        idle_w: float,
        load_w: float,
        *,
        cpu_times: Callable[[], CpuTimes] = psutil_cpu_times,
    ) -> None:
        if not 0 <= idle_w <= load_w:
            raise ValueError(f"estimate needs 0 <= idle_w <= load_w, got {idle_w}, {load_w}")
        self._idle_w = idle_w
        self._load_w = load_w
        self._cpu_times = cpu_times
        self._previous = cpu_times()  # baseline so the first read covers a real interval
        self._util = 0.0
        self.detail = f"linear(idle_w={idle_w:g},load_w={load_w:g})"

    def read(self) -> PowerSample:
        try:
            current = self._cpu_times()
        except OSError as err:
            raise SensorError(f"estimate: cannot read CPU times: {err}") from err
        util = utilisation(self._previous, current)
        if util is not None:  # else no CPU time elapsed: keep the last utilisation
            self._util = util
            self._previous = current
        mw = estimate_mw(self._idle_w, self._load_w, self._util)
        return PowerSample(mw, ESTIMATE, self.detail)

    @property
    def last_utilisation(self) -> float:
        return self._util

"""Background power and thermal sampling, aggregated into telemetry windows.

A daemon thread reads the power reader every ``interval_s`` (and the thermal
reader every ``thermal_interval_s``); ``window()`` returns the aggregate since
the previous call and starts a new one. Energy per inference is a pure
function of a window's mean power, its duration and the inference count.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from agent.common.errors import ConfigError, SensorError
from agent.telemetry.power.base import SENSOR, PowerReader
from agent.telemetry.thermal import ThermalReader, ThermalSample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerConfig:
    interval_s: float = 1.0
    thermal_interval_s: float = 5.0  # vcgencmd costs a fork: sample thermal less often
    join_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.thermal_interval_s <= 0 or self.join_timeout_s <= 0:
            raise ConfigError(f"sampler intervals and timeouts must be > 0: {self}")


@dataclass(frozen=True)
class EnergyPerInference:
    total_mj: float | None
    above_idle_mj: float | None


def energy_per_inference(
    mean_mw: float | None, duration_s: float, inferences: int, idle_mw: float
) -> EnergyPerInference:
    """mJ per inference over a window, total and above the board's idle draw (pure).

    mW x s = mJ. None when there were no inferences or no power samples; power
    below idle counts as zero above idle rather than negative.
    """
    if duration_s < 0 or inferences < 0 or idle_mw < 0:
        raise ValueError(
            f"need duration_s, inferences, idle_mw >= 0: {duration_s}, {inferences}, {idle_mw}"
        )
    if mean_mw is None or inferences == 0:
        return EnergyPerInference(None, None)
    total = mean_mw * duration_s / inferences
    above = max(0.0, mean_mw - idle_mw) * duration_s / inferences
    return EnergyPerInference(total, above)


@dataclass(frozen=True)
class PowerWindow:
    duration_s: float
    samples: int
    mean_mw: float | None
    max_mw: float | None
    source: str | None  # "sensor" only if every sample was; None without samples
    detail: str | None  # the latest sample's detail label
    energy_mj: float | None
    read_errors: int
    thermal: ThermalSample | None  # latest thermal sample in the window
    max_temp_c: float | None
    throttled: bool | None  # any throttling evidence during the window
    throttle_flags: tuple[str, ...]

    def per_inference(self, inferences: int, idle_mw: float) -> EnergyPerInference:
        return energy_per_inference(self.mean_mw, self.duration_s, inferences, idle_mw)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready power and thermal fields of a telemetry window."""
        return {
            "mw": None if self.mean_mw is None else round(self.mean_mw, 1),
            "source": self.source,
            "detail": self.detail,
            "samples": self.samples,
            "energy_mj": None if self.energy_mj is None else round(self.energy_mj, 1),
            "read_errors": self.read_errors,
            "max_temp_c": self.max_temp_c,
            "throttled": self.throttled,
            "throttle_flags": list(self.throttle_flags),
            "thermal": None if self.thermal is None else self.thermal.to_dict(),
        }


class _Window:
    """Running aggregates; guarded by the sampler's lock."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.samples = 0
        self.sum_mw = 0.0
        self.max_mw: float | None = None
        self.all_sensor = True
        self.detail: str | None = None
        self.errors = 0
        self.thermal: ThermalSample | None = None
        self.max_temp_c: float | None = None
        self.throttled: bool | None = None
        self.flags: dict[str, None] = {}  # ordered set


class PowerSampler:
    def __init__(
        self,
        power: PowerReader,
        thermal: ThermalReader | None = None,
        config: SamplerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.power = power
        self.thermal = thermal
        self.config = config or SamplerConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._window = _Window(clock())
        self._next_thermal = self._window.start
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._logged: set[str] = set()

    def _log_once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            logger.warning("sampler: %s", message)

    def sample_once(self, *, thermal: bool | None = None) -> None:
        """Take one power sample, and a thermal one if due (or if ``thermal`` forces it)."""
        now = self._clock()
        try:
            power = self.power.read()
        except SensorError as err:
            power = None
            self._log_once(str(err))
        therm: ThermalSample | None = None
        want_thermal = thermal if thermal is not None else now >= self._next_thermal
        if self.thermal is not None and want_thermal:
            self._next_thermal = now + self.config.thermal_interval_s
            therm = self.thermal.read()
        with self._lock:
            win = self._window
            if power is None:
                win.errors += 1
            else:
                win.samples += 1
                win.sum_mw += power.mw
                win.max_mw = power.mw if win.max_mw is None else max(win.max_mw, power.mw)
                win.all_sensor = win.all_sensor and power.source == SENSOR
                win.detail = power.detail
            if therm is not None:
                win.thermal = therm
                hot = therm.max_c
                if hot is not None:
                    win.max_temp_c = hot if win.max_temp_c is None else max(win.max_temp_c, hot)
                if therm.throttled is not None:
                    win.throttled = bool(win.throttled) or therm.throttled
                win.flags.update(dict.fromkeys(therm.flags))

    def window(self) -> PowerWindow:
        """The aggregate since the previous call; a new window starts now."""
        now = self._clock()
        with self._lock:
            win, self._window = self._window, _Window(now)
        duration = max(0.0, now - win.start)
        mean = win.sum_mw / win.samples if win.samples else None
        return PowerWindow(
            duration_s=duration,
            samples=win.samples,
            mean_mw=mean,
            max_mw=win.max_mw,
            source=None if not win.samples else SENSOR if win.all_sensor else "estimate",
            detail=win.detail,
            energy_mj=None if mean is None else mean * duration,
            read_errors=win.errors,
            thermal=win.thermal,
            max_temp_c=win.max_temp_c,
            throttled=win.throttled,
            throttle_flags=tuple(win.flags),
        )

    def _run(self) -> None:
        next_due = self._clock()
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception:  # keep sampling: one bad reading must not end telemetry
                logger.exception("sampler: unexpected error while sampling")
                with self._lock:
                    self._window.errors += 1
            next_due += self.config.interval_s
            delay = next_due - self._clock()
            if delay < 0:  # fell behind (suspend, slow sensor): skip, do not burst
                next_due = self._clock()
                delay = 0.0
            self._stop.wait(delay)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="edgefleet-power-sampler", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.config.join_timeout_s)
            if self._thread.is_alive():
                logger.warning("sampler thread did not stop within %ss", self.config.join_timeout_s)
            self._thread = None

    def __enter__(self) -> PowerSampler:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

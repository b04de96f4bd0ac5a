"""Board power readers, one per measurement method, chosen by the firmware profile.

``make_power_reader(method, root, params)`` builds one reader;
``make_resilient_power_reader`` wraps it so a missing or broken sensor is
logged once and replaced by the labelled ``estimate`` instead of losing power
telemetry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from agent.common.errors import ConfigError, SensorError
from agent.telemetry.power.base import (
    ESTIMATE,
    METHODS,
    SENSOR,
    PowerParams,
    PowerReader,
    PowerSample,
)
from agent.telemetry.power.estimate import EstimateReader
from agent.telemetry.power.hwmon_ina3221 import HwmonIna3221Reader
from agent.telemetry.power.iio_ina3221x import IioIna3221xReader
from agent.telemetry.power.rapl import RaplReader
from agent.telemetry.power.rpi5_pmic import Rpi5PmicReader

__all__ = [
    "ESTIMATE",
    "METHODS",
    "SENSOR",
    "EstimateReader",
    "HwmonIna3221Reader",
    "IioIna3221xReader",
    "PowerParams",
    "PowerReader",
    "PowerSample",
    "RaplReader",
    "ResilientPowerReader",
    "Rpi5PmicReader",
    "make_power_reader",
    "make_resilient_power_reader",
    "resilient",
]

logger = logging.getLogger(__name__)


def _params(params: PowerParams | Mapping[str, object] | None) -> PowerParams:
    if params is None:
        return PowerParams()
    if isinstance(params, PowerParams):
        return params
    return PowerParams.from_mapping(params)


def make_power_reader(
    method: str,
    root: str | Path = "/",
    params: PowerParams | Mapping[str, object] | None = None,
) -> PowerReader:
    """The reader for ``method``; an unknown method is a ``ConfigError``. No IO happens here."""
    p = _params(params)
    if method == "hwmon_ina3221":
        return HwmonIna3221Reader(root, p.hwmon_total_rail)
    if method == "iio_ina3221x":
        return IioIna3221xReader(root, p.iio_total_rail)
    if method == "rpi5_pmic":
        return Rpi5PmicReader(p.vcgencmd_path, p.command_timeout_s)
    if method == "rapl":
        return RaplReader(root, p.rapl_zone, p.prime_s)
    if method == "estimate":
        return EstimateReader(p.idle_w, p.load_w)
    raise ConfigError(f"unknown power method {method!r}; expected one of {list(METHODS)}")


class ResilientPowerReader:
    """Try ``primary`` on every read; on ``SensorError`` return ``fallback``'s sample.

    The first failure is logged as a warning with the sensor's message and each
    recovery is logged once, so a broken sensor is loud but does not spam.
    """

    def __init__(self, primary: PowerReader, fallback: PowerReader) -> None:
        self.primary = primary
        self.fallback = fallback
        self.failures = 0
        self.last_error: SensorError | None = None
        self._failing = False

    @property
    def method(self) -> str:
        return self.primary.method

    def read(self) -> PowerSample:
        try:
            sample = self.primary.read()
        except SensorError as err:
            self.failures += 1
            self.last_error = err
            if not self._failing:
                logger.warning(
                    "power sensor %s failed, falling back to %s: %s",
                    self.primary.method, self.fallback.method, err,
                )
                self._failing = True
            else:
                logger.debug("power sensor %s still failing: %s", self.primary.method, err)
            backup = self.fallback.read()
            note = f"{backup.detail} (fallback: {self.primary.method} failed)"
            return replace(backup, detail=note)
        if self._failing:
            logger.info("power sensor %s recovered", self.primary.method)
            self._failing = False
        return sample


def resilient(primary: PowerReader, fallback: PowerReader) -> ResilientPowerReader:
    return ResilientPowerReader(primary, fallback)


def make_resilient_power_reader(
    method: str,
    root: str | Path = "/",
    params: PowerParams | Mapping[str, object] | None = None,
) -> PowerReader:
    """``make_power_reader`` wrapped to fall back to the labelled estimate."""
    p = _params(params)
    reader = make_power_reader(method, root, p)
    if method == "estimate":
        return reader
    return resilient(reader, EstimateReader(p.idle_w, p.load_w))

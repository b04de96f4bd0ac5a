"""Shared power-reading types: the sample, the reader protocol and its parameters.

Every reader returns a ``PowerSample`` whose ``source`` says whether the number
came from a sensor or from the linear CPU-load estimate, so an operator never
mistakes one for the other.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Final, Protocol

from agent.common.errors import ConfigError

SENSOR: Final = "sensor"
ESTIMATE: Final = "estimate"
METHODS: Final = ("hwmon_ina3221", "iio_ina3221x", "rpi5_pmic", "rapl", "estimate")


@dataclass(frozen=True)
class PowerSample:
    """One power reading in milliwatts.

    ``source`` is ``"sensor"`` or ``"estimate"``; ``detail`` says which sensor or
    model produced it (e.g. ``"rpi5_pmic (on-board rails)"``); ``rails`` holds the
    per-rail mW that went into the total, when the method has rails.
    """

    mw: float
    source: str
    detail: str = ""
    rails: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.source not in (SENSOR, ESTIMATE):
            raise ValueError(f"power source must be sensor or estimate, not {self.source!r}")

    @property
    def label(self) -> str:
        """``source:detail``, the string telemetry carries."""
        return f"{self.source}:{self.detail}" if self.detail else self.source


class PowerReader(Protocol):
    """Reads the board's current power draw; raises ``SensorError`` when it cannot."""

    @property
    def method(self) -> str: ...

    def read(self) -> PowerSample: ...


@dataclass(frozen=True)
class PowerParams:
    """Per-board power constants and limits, from the firmware profile's ``[power]`` table."""

    idle_w: float = 2.0  # measured board idle; also the baseline for "mJ above idle"
    load_w: float = 6.0  # measured board draw at 100 % CPU, for the estimate
    vcgencmd_path: str = "vcgencmd"
    command_timeout_s: float = 2.0
    rapl_zone: str = "intel-rapl:0"
    prime_s: float = 0.05  # first RAPL/CPU delta is measured over this long
    hwmon_total_rail: str = "VDD_IN"
    iio_total_rail: str = "POM_5V_IN"

    def __post_init__(self) -> None:
        if not 0 <= self.idle_w <= self.load_w:
            raise ConfigError(
                f"power params need 0 <= idle_w <= load_w, got idle_w={self.idle_w} "
                f"load_w={self.load_w}"
            )
        if self.command_timeout_s <= 0 or self.prime_s <= 0:
            raise ConfigError("power params command_timeout_s and prime_s must be > 0")

    @classmethod
    def from_mapping(
        cls, table: Mapping[str, object], ignore: Collection[str] = ()
    ) -> PowerParams:
        """Build from a profile table; unknown keys and wrong types are ``ConfigError``.

        ``ignore`` names keys that belong to the caller (e.g. ``method``, ``interval_s``).
        """
        table = {key: value for key, value in table.items() if key not in ignore}
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise ConfigError(f"unknown power parameter(s) {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}  # types checked per field below
        for name, value in table.items():
            default = getattr(cls, name)
            if isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(f"power parameter {name} must be a number, got {value!r}")
                values[name] = float(value)
            elif not isinstance(value, str) or not value:
                raise ConfigError(f"power parameter {name} must be a non-empty string: {value!r}")
            else:
                values[name] = value
        return replace(cls(), **values)

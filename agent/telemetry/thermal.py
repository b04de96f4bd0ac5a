"""Temperatures and throttling evidence: thermal zones, Pi throttle bits,
Jetson soctherm over-current events and the CPU frequency cap.

Each part has its own function that raises ``SensorError`` with a clear
message; ``ThermalReader.read`` runs the configured parts, keeps whatever
succeeded and records the failures in ``ThermalSample.errors`` (logged once per
distinct message), so one broken zone never hides the others.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from agent.common.errors import ConfigError, SensorError
from agent.telemetry.power.sysfs import find_hwmon, numeric_key, read_int, read_text
from agent.telemetry.power.vcgencmd import run_vcgencmd

logger = logging.getLogger(__name__)

ZONES_GLOB: Final = "sys/class/thermal/thermal_zone*"
CPUFREQ_GLOB: Final = "sys/devices/system/cpu/cpufreq/policy*"
THROTTLE_METHODS: Final = ("none", "vcgencmd", "soctherm_oc")
_THROTTLED = re.compile(r"^\s*throttled=(0x[0-9a-fA-F]+)\s*$")
_OC_FILE = re.compile(r"^(oc\d+)_event_cnt$")

# vcgencmd get_throttled bits: (name, bit now, bit since boot).
THROTTLE_BITS: Final = (
    ("under_voltage", 0x1, 0x10000),
    ("freq_capped", 0x2, 0x20000),
    ("throttled", 0x4, 0x40000),
    ("soft_temp_limit", 0x8, 0x80000),
)


@dataclass(frozen=True)
class ThrottleState:
    """Decoded ``vcgencmd get_throttled``: flag names active now and since boot."""

    raw: int
    now: frozenset[str]
    since_boot: frozenset[str]


def decode_throttled(raw: int) -> ThrottleState:
    now = frozenset(name for name, bit, _ in THROTTLE_BITS if raw & bit)
    since = frozenset(name for name, _, bit in THROTTLE_BITS if raw & bit)
    return ThrottleState(raw, now, since)


def parse_get_throttled(text: str) -> ThrottleState:
    """Decode ``throttled=0x50005`` (pure)."""
    match = _THROTTLED.match(text.strip())
    if match is None:
        raise SensorError(f"get_throttled: expected 'throttled=0x...', got {text.strip()[:80]!r}")
    return decode_throttled(int(match.group(1), 16))


def read_zones(
    root: str | Path, zones_glob: str = ZONES_GLOB
) -> tuple[dict[str, float], list[str]]:
    """``{zone type: °C}`` for readable zones and one error message per unreadable zone.

    Raises ``SensorError`` when no zone matches or none can be read. Zones with
    the same type (x86 often has several ``acpitz``) are keyed ``type@zoneN``.
    """
    zones = sorted(Path(root).glob(zones_glob.lstrip("/")), key=numeric_key)
    if not zones:
        raise SensorError(f"thermal: no zone matches {Path(root) / zones_glob.lstrip('/')}")
    temps: dict[str, float] = {}
    errors: list[str] = []
    for zone in zones:
        try:
            kind = read_text(zone / "type", "thermal zone type") or zone.name
            millideg = read_int(zone / "temp", f"thermal zone {kind}")
        except SensorError as err:
            errors.append(str(err))
            continue
        key = kind if kind not in temps else f"{kind}@{zone.name}"
        temps[key] = millideg / 1000.0
    if not temps:
        raise SensorError(f"thermal: no readable zone ({errors[0]})")
    return temps, errors


def read_soctherm_oc(root: str | Path) -> dict[str, int]:
    """Jetson ``soctherm_oc`` hwmon over-current throttle event counts since boot."""
    counts: dict[str, int] = {}
    devices = find_hwmon(root, "soctherm_oc")
    if not devices:
        raise SensorError(f"soctherm_oc: no hwmon named 'soctherm_oc' under {root}")
    for device in devices:
        for path in sorted(device.glob("oc*_event_cnt"), key=numeric_key):
            match = _OC_FILE.match(path.name)
            if match is not None:
                counts[match.group(1)] = read_int(path, "soctherm_oc event count")
    if not counts:
        raise SensorError(f"soctherm_oc: {devices[0]} has no oc*_event_cnt files")
    return counts


@dataclass(frozen=True)
class CpuFreqCap:
    """Lowest ``scaling_max_freq / cpuinfo_max_freq`` across cpufreq policies."""

    ratio: float
    policies: Mapping[str, tuple[int, int]]  # policy -> (scaling_max_khz, cpuinfo_max_khz)

    @property
    def capped(self) -> bool:
        return self.ratio < 1.0


def read_cpufreq_cap(root: str | Path, policies_glob: str = CPUFREQ_GLOB) -> CpuFreqCap:
    policies = sorted(Path(root).glob(policies_glob.lstrip("/")), key=numeric_key)
    if not policies:
        raise SensorError(f"cpufreq: no policy matches {Path(root) / policies_glob.lstrip('/')}")
    found: dict[str, tuple[int, int]] = {}
    for policy in policies:
        scaling = read_int(policy / "scaling_max_freq", "cpufreq scaling_max_freq")
        hardware = read_int(policy / "cpuinfo_max_freq", "cpufreq cpuinfo_max_freq")
        if hardware <= 0 or scaling <= 0:
            raise SensorError(f"cpufreq: {policy} reports non-positive max frequency")
        found[policy.name] = (scaling, hardware)
    return CpuFreqCap(min(s / h for s, h in found.values()), found)


@dataclass(frozen=True)
class ThermalSample:
    zones_c: dict[str, float] = field(default_factory=dict)
    throttle: ThrottleState | None = None  # Raspberry Pi only
    oc_events: dict[str, int] | None = None  # Jetson only, counts since boot
    oc_events_new: int | None = None  # increase since the previous read
    cpufreq: CpuFreqCap | None = None
    errors: tuple[str, ...] = ()

    @property
    def max_c(self) -> float | None:
        return max(self.zones_c.values()) if self.zones_c else None

    @property
    def flags(self) -> tuple[str, ...]:
        """Throttling evidence right now, as stable flag names."""
        found: list[str] = []
        if self.throttle is not None:
            found.extend(name for name, _, _ in THROTTLE_BITS if name in self.throttle.now)
        if self.oc_events_new:
            found.append("soctherm_oc")
        if self.cpufreq is not None and self.cpufreq.capped:
            found.append("cpufreq_capped")  # thermal cooling or a deliberate power mode
        return tuple(found)

    @property
    def throttled(self) -> bool | None:
        """Any throttling evidence; None when no throttle source could be read."""
        if self.throttle is None and self.oc_events_new is None and self.cpufreq is None:
            return None
        return bool(self.flags)

    def to_dict(self) -> dict[str, object]:
        return {
            "zones_c": dict(self.zones_c),
            "max_c": self.max_c,
            "throttled": self.throttled,
            "flags": list(self.flags),
            "since_boot": sorted(self.throttle.since_boot) if self.throttle else None,
            "oc_events": dict(self.oc_events) if self.oc_events is not None else None,
            "cpu_max_freq_ratio": self.cpufreq.ratio if self.cpufreq else None,
            "errors": list(self.errors),
        }


@dataclass(frozen=True)
class ThermalConfig:
    root: str = "/"
    zones_glob: str = ZONES_GLOB
    throttle_method: str = "none"  # "vcgencmd" on Pi, "soctherm_oc" on Jetson
    cpufreq_glob: str = CPUFREQ_GLOB
    vcgencmd_path: str = "vcgencmd"
    command_timeout_s: float = 2.0


class ThermalReader:
    def __init__(
        self,
        root: str | Path = "/",
        zones_glob: str = ZONES_GLOB,
        throttle_method: str = "none",
        *,
        cpufreq_glob: str | None = CPUFREQ_GLOB,
        vcgencmd_path: str = "vcgencmd",
        command_timeout_s: float = 2.0,
    ) -> None:
        if throttle_method not in THROTTLE_METHODS:
            raise ConfigError(
                f"unknown throttle method {throttle_method!r}; expected one of {THROTTLE_METHODS}"
            )
        self.root = Path(root)
        self.zones_glob = zones_glob
        self.throttle_method = throttle_method
        self.cpufreq_glob = cpufreq_glob
        self.vcgencmd_path = vcgencmd_path
        self.command_timeout_s = command_timeout_s
        self._last_oc: dict[str, int] | None = None
        self._logged: set[str] = set()

    @classmethod
    def from_config(cls, config: ThermalConfig) -> ThermalReader:
        return cls(
            config.root, config.zones_glob, config.throttle_method,
            cpufreq_glob=config.cpufreq_glob, vcgencmd_path=config.vcgencmd_path,
            command_timeout_s=config.command_timeout_s,
        )

    def read_throttle(self) -> ThrottleState:
        text = run_vcgencmd(self.vcgencmd_path, ["get_throttled"], self.command_timeout_s)
        return parse_get_throttled(text)

    def read(self) -> ThermalSample:
        errors: list[str] = []
        zones: dict[str, float] = {}
        throttle: ThrottleState | None = None
        oc: dict[str, int] | None = None
        oc_new: int | None = None
        cpufreq: CpuFreqCap | None = None
        try:
            zones, zone_errors = read_zones(self.root, self.zones_glob)
            errors.extend(zone_errors)
        except SensorError as err:
            errors.append(str(err))
        try:
            if self.throttle_method == "vcgencmd":
                throttle = self.read_throttle()
            elif self.throttle_method == "soctherm_oc":
                oc = read_soctherm_oc(self.root)
                oc_new = oc_increase(self._last_oc, oc)
                self._last_oc = oc
        except SensorError as err:
            errors.append(str(err))
        if self.cpufreq_glob is not None:
            try:
                cpufreq = read_cpufreq_cap(self.root, self.cpufreq_glob)
            except SensorError as err:
                errors.append(str(err))
        for message in errors:
            if message not in self._logged:
                self._logged.add(message)
                logger.warning("thermal: %s", message)
        return ThermalSample(zones, throttle, oc, oc_new, cpufreq, tuple(errors))


def oc_increase(previous: Mapping[str, int] | None, current: Mapping[str, int]) -> int:
    """New over-current events since ``previous`` (0 on the first read; pure)."""
    if previous is None:
        return 0
    total = 0
    for name, value in current.items():
        before = previous.get(name, 0)
        # A counter that went down means a reboot or driver reload: count from zero.
        total += value - before if value >= before else value
    return total

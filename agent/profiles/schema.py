"""Firmware profiles: one TOML per board family, parsed strictly into typed specs.

A profile says how to recognise the board (``[detect]``), which runtime, delegate,
thread count and model variant to use (``[runtime]``), how to read power
(``[power]``) and where the thermal zones and throttle flags are (``[thermal]``).
Parsing is strict: unknown keys, wrong types and unknown methods are errors
that name the file and the field.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.common.errors import ProfileError
from agent.inference.runtime import DELEGATES, RUNTIME_TYPES
from agent.protocol.manifest import VARIANTS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


PROFILES_DIR_ENV = "EDGEFLEET_PROFILES_DIR"
# Power method -> the keys it requires besides method, idle_w, load_w, sample_interval_s.
POWER_METHODS: dict[str, tuple[str, ...]] = {
    "hwmon_ina3221": ("hwmon_glob",),  # optional total_rail
    "iio_ina3221x": ("iio_glob",),  # optional total_rail
    "rpi5_pmic": ("command",),
    "rapl": ("energy_path", "max_energy_path"),
    "estimate": (),
}
THROTTLE_METHODS = ("vcgencmd", "soctherm", "none")
DEVICE_TREE_MODEL = "/proc/device-tree/model"
NV_TEGRA_RELEASE = "/etc/nv_tegra_release"
USB_DEVICES = "/sys/bus/usb/devices"


class ProfileFileError(ProfileError):
    """A profile file is malformed; carries the file and the offending field."""

    def __init__(self, path: Path, field: str, reason: str) -> None:
        super().__init__(f"{path}: {field}: {reason}")
        self.path = path
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class DetectRules:
    """Every non-empty rule must hold; within one list, any entry suffices
    (except ``paths_present``, where each glob must match)."""

    machine: tuple[str, ...] = ()
    device_tree_model: tuple[str, ...] = ()
    nv_tegra_release: tuple[str, ...] = ()
    paths_present: tuple[str, ...] = ()
    paths_absent: tuple[str, ...] = ()
    usb_ids: tuple[str, ...] = ()

    @property
    def globs(self) -> tuple[str, ...]:
        return self.paths_present + self.paths_absent


@dataclass(frozen=True)
class RuntimeSpec:
    type: str
    delegate: str | None
    delegate_device: str
    num_threads: int
    variant_preference: tuple[str, ...]


@dataclass(frozen=True)
class PowerSpec:
    """How to read board power; idle/load watts also drive the labelled estimate fallback."""

    method: str
    idle_w: float
    load_w: float
    sample_interval_s: float
    hwmon_glob: str | None = None
    iio_glob: str | None = None
    total_rail: str | None = None
    command: tuple[str, ...] = ()
    energy_path: str | None = None
    max_energy_path: str | None = None


@dataclass(frozen=True)
class ThermalSpec:
    zones_glob: str
    throttle_method: str
    cpufreq_path: str
    throttle_command: tuple[str, ...] = ()
    oc_hwmon_glob: str | None = None
    oc_hwmon_name: str | None = None
    extra_temp_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    priority: int
    detect: DetectRules
    runtime: RuntimeSpec
    power: PowerSpec
    thermal: ThermalSpec
    source: Path


def under_root(root: Path, path: str) -> Path:
    """``path`` (absolute, as written in a profile) inside ``root``."""
    return root / path.lstrip("/")


# Shipped inside the package (package data), so an agent installed from a wheel has them.
SHIPPED_PROFILES_DIR = Path(__file__).resolve().parent / "data"


def default_profiles_dir() -> Path:
    """``$EDGEFLEET_PROFILES_DIR`` (a site's own profiles), else the shipped ones."""
    env = os.environ.get(PROFILES_DIR_ENV)
    if env:
        return Path(env)
    return SHIPPED_PROFILES_DIR


# ---- strict TOML field reader ----------------------------------------------------


class FieldError(Exception):
    """Internal: one bad field; parse_profile turns it into ProfileFileError."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


_MISSING: Any = object()


class Fields:
    """Typed reads from one TOML table; ``done()`` rejects every key nobody read."""

    def __init__(self, data: Any, section: str) -> None:
        self.section = section
        if not isinstance(data, Mapping):
            raise self.error("", "must be a table")
        self._data, self._used = data, set[str]()

    def error(self, key: str, reason: str) -> FieldError:
        where = f"[{self.section}]" if self.section else ""
        return FieldError(f"{where}.{key}" if where and key else where or key, reason)

    def get(self, key: str, kind: type | tuple[type, ...], what: str, default: Any) -> Any:
        self._used.add(key)
        value = self._data.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise self.error(key, "is missing")
            return default
        if not isinstance(value, kind) or isinstance(value, bool):
            raise self.error(key, f"must be {what}, got {type(value).__name__} {value!r}")
        return value

    def text(self, key: str, pattern: str = "", default: Any = _MISSING) -> Any:
        value = self.get(key, str, "a string", default)
        if isinstance(value, str) and not re.match(pattern, value):
            raise self.error(key, f"{value!r} does not match {pattern}")
        return value

    def choice(self, key: str, options: Iterable[str]) -> str:
        value: str = self.text(key)
        if value not in options:
            raise self.error(key, f"unknown value {value!r}; expected one of {', '.join(options)}")
        return value

    def number(self, key: str, low: float, high: float, integral: bool = False) -> Any:
        kind: Any = int if integral else (int, float)
        value = self.get(key, kind, "an integer" if integral else "a number", _MISSING)
        if not low <= value <= high:
            raise self.error(key, f"{value} is outside [{low}, {high}]")
        return value if integral else float(value)

    def texts(self, key: str, required: bool = True, pattern: str = "") -> tuple[str, ...]:
        value = self.get(key, list, "a list of strings", _MISSING if required else [])
        if not value and required:
            raise self.error(key, "must not be empty")
        for item in value:
            if not isinstance(item, str) or not item or not re.match(pattern, item):
                raise self.error(key, f"entry {item!r} must be a non-empty string "
                                      f"matching {pattern or 'anything'}")
        return tuple(value)

    def abs_paths(self, key: str) -> tuple[str, ...]:
        return tuple(self._absolute(key, p) for p in self.texts(key, required=False))

    def abs_path(self, key: str) -> str:
        return self._absolute(key, self.text(key))

    def _absolute(self, key: str, value: str) -> str:
        # Profile paths are absolute device paths, resolved under a root at run time.
        if not value.startswith("/") or ".." in Path(value).parts:
            raise self.error(key, f"{value!r} must be an absolute path without '..'")
        return value

    def table(self, key: str) -> Fields:
        if key not in self._data:
            raise FieldError(f"[{key}]", "is missing")
        return Fields(self.get(key, dict, "a table", _MISSING), key)

    def done(self, context: str = "") -> None:
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            raise self.error(unknown[0], "unknown key" + (f" {context}" if context else ""))


# ---- parsing -------------------------------------------------------------------


def _detect(f: Fields) -> DetectRules:
    rules = DetectRules(
        machine=f.texts("machine", required=False),
        device_tree_model=f.texts("device_tree_model", required=False),
        nv_tegra_release=f.texts("nv_tegra_release", required=False),
        paths_present=f.abs_paths("paths_present"),
        paths_absent=f.abs_paths("paths_absent"),
        usb_ids=f.texts("usb_ids", required=False, pattern=r"^[0-9a-f]{4}:[0-9a-f]{4}$"),
    )
    f.done()
    if not any((rules.machine, rules.device_tree_model, rules.nv_tegra_release,
                rules.paths_present, rules.paths_absent, rules.usb_ids)):
        raise f.error("", "needs at least one rule, or it would match every board")
    return rules


def _runtime(f: Fields) -> RuntimeSpec:
    rtype = f.choice("type", RUNTIME_TYPES)
    delegate = f.choice("delegate", ("none", *DELEGATES))
    device = f.text("delegate_device", r"^(usb|pci)?(:\d+)?$", "")
    if delegate == "none" and device:
        raise f.error("delegate_device", "is set but delegate is 'none'")
    variants = f.texts("variant_preference")
    for v in variants:
        if v not in VARIANTS:
            raise f.error("variant_preference", f"unknown variant {v!r}; expected {VARIANTS}")
    if len(set(variants)) != len(variants):
        raise f.error("variant_preference", "lists a variant twice")
    spec = RuntimeSpec(
        type=rtype,
        delegate=None if delegate == "none" else delegate,
        delegate_device=device,
        num_threads=f.number("num_threads", 1, 64, integral=True),
        variant_preference=variants,
    )
    f.done()
    return spec


def _power(f: Fields) -> PowerSpec:
    method = f.choice("method", tuple(POWER_METHODS))
    required = POWER_METHODS[method]
    idle = f.number("idle_w", 0.0, 1000.0)
    load = f.number("load_w", 0.0, 1000.0)
    if load < idle:
        raise f.error("load_w", f"{load} is below idle_w {idle}")

    def path(key: str) -> str | None:
        return f.abs_path(key) if key in required else None

    spec = PowerSpec(
        method=method,
        idle_w=idle,
        load_w=load,
        sample_interval_s=f.number("sample_interval_s", 0.05, 3600.0),
        hwmon_glob=path("hwmon_glob"),
        iio_glob=path("iio_glob"),
        total_rail=f.text("total_rail", default=None) if "_ina3221" in method else None,
        command=f.texts("command") if "command" in required else (),
        energy_path=path("energy_path"),
        max_energy_path=path("max_energy_path"),
    )
    f.done(f"for power method {method!r}")
    return spec


def _thermal(f: Fields) -> ThermalSpec:
    method = f.choice("throttle_method", THROTTLE_METHODS)
    spec = ThermalSpec(
        zones_glob=f.abs_path("zones_glob"),
        throttle_method=method,
        cpufreq_path=f.abs_path("cpufreq_path"),
        throttle_command=f.texts("throttle_command") if method == "vcgencmd" else (),
        oc_hwmon_glob=f.abs_path("oc_hwmon_glob") if method == "soctherm" else None,
        oc_hwmon_name=f.text("oc_hwmon_name") if method == "soctherm" else None,
        extra_temp_paths=f.abs_paths("extra_temp_paths"),
    )
    f.done(f"for throttle method {method!r}")
    return spec


def parse_profile(data: Mapping[str, Any], path: Path) -> Profile:
    """Validate one decoded profile; pure, so garbage can be tested without files."""
    try:
        top = Fields(data, "")
        name = top.text("name", pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
        if name != path.stem:
            raise top.error("name", f"{name!r} must equal the file name {path.stem!r}")
        profile = Profile(
            name=name,
            description=top.text("description"),
            priority=top.number("priority", 0, 1000, integral=True),
            detect=_detect(top.table("detect")),
            runtime=_runtime(top.table("runtime")),
            power=_power(top.table("power")),
            thermal=_thermal(top.table("thermal")),
            source=path,
        )
        top.done()
    except FieldError as err:
        raise ProfileFileError(path, err.field, err.reason) from err
    return profile


def load_profile(path: Path) -> Profile:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as err:
        raise ProfileFileError(path, "(file)", f"cannot be read: {err}") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ProfileFileError(path, "(file)", f"invalid TOML: {err}") from err
    return parse_profile(data, path)


def load_profiles(directory: Path | None = None) -> dict[str, Profile]:
    """Every ``*.toml`` in ``directory`` (default: :func:`default_profiles_dir`), by name."""
    folder = default_profiles_dir() if directory is None else Path(directory)
    if not folder.is_dir():
        raise ProfileError(f"firmware profile directory {folder} does not exist")
    files = sorted(folder.glob("*.toml"))
    if not files:
        raise ProfileError(f"firmware profile directory {folder} holds no .toml profiles")
    return {p.name: p for p in (load_profile(f) for f in files)}

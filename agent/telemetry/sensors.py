"""Power and thermal sensing for one board, built from its firmware profile.

The profile's ``[power]`` and ``[thermal]`` tables become a resilient power
reader (a broken sensor falls back to the labelled ``estimate`` with the
profile's idle/load watts), a thermal reader and a ``PowerSampler`` thread.
Everything is read under ``hw_root``, so an agent pointed at a fake board tree
reads that tree's sysfs and runs that tree's ``vcgencmd``, never the host's.

Profile fields the readers cannot honour are a ``ConfigError`` at start-up
(e.g. a RAPL path outside powercap), not a silent mismatch in the field.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from agent.common.errors import ConfigError, SensorError
from agent.profiles.schema import PowerSpec, Profile, ThermalSpec
from agent.telemetry.power import PowerParams, PowerReader, make_resilient_power_reader
from agent.telemetry.power.sysfs import read_int, under
from agent.telemetry.sampler import PowerSampler, SamplerConfig
from agent.telemetry.thermal import CPUFREQ_GLOB, ThermalReader, ThermalSample

log = logging.getLogger(__name__)

# Profile throttle method -> ThermalReader throttle method.
_THROTTLE: dict[str, str] = {"vcgencmd": "vcgencmd", "soctherm": "soctherm_oc", "none": "none"}
_POWERCAP = PurePosixPath("/sys/class/powercap")


@dataclass(frozen=True)
class SensorConfig:
    """Limits of the sensing side; the sample interval itself comes from the profile."""

    thermal_interval_s: float = 5.0  # vcgencmd forks: sample thermal less often than power
    min_samples_per_window: int = 2  # short telemetry windows sample faster than the profile
    join_timeout_s: float = 5.0
    command_timeout_s: float = 2.0
    # Where a bare command name (``vcgencmd``) is looked for inside a non-/ hw_root.
    command_dirs: tuple[str, ...] = ("/usr/bin", "/bin", "/usr/local/bin", "/opt/vc/bin")

    def __post_init__(self) -> None:
        if self.thermal_interval_s <= 0 or self.join_timeout_s <= 0 or self.command_timeout_s <= 0:
            raise ConfigError(f"sensor intervals and timeouts must be > 0: {self}")
        if self.min_samples_per_window < 1:
            raise ConfigError(f"min_samples_per_window must be >= 1: {self}")


def is_host_root(root: Path) -> bool:
    return Path(root).resolve() == Path("/")


def resolve_command(name: str, root: Path, config: SensorConfig | None = None) -> str:
    """The executable to run for a profile command under ``root``.

    On the real root a bare name goes through ``$PATH``. Under a fake tree the
    command must come from that tree; when it has none, the returned path does
    not exist, so the reader fails clearly and falls back, instead of running
    the host's tool and reporting the host's numbers as the board's.
    """
    cfg = config or SensorConfig()
    if is_host_root(root):
        return name
    if name.startswith("/"):
        return str(under(root, name))
    for folder in cfg.command_dirs:
        candidate = under(root, f"{folder}/{name}")
        if candidate.is_file():
            return str(candidate)
    return str(under(root, f"{cfg.command_dirs[0]}/{name}"))


def _command_path(command: tuple[str, ...], expected_args: tuple[str, ...], field: str) -> str:
    if not command:
        raise ConfigError(f"profile {field} is empty")
    if command[1:] != expected_args:
        raise ConfigError(
            f"profile {field} {list(command)} must run {' '.join(expected_args)!r}; "
            "only the executable may change"
        )
    return command[0]


def _rapl_zone(spec: PowerSpec) -> str:
    """The powercap zone named by the profile's RAPL paths (``intel-rapl:0``)."""
    if spec.energy_path is None or spec.max_energy_path is None:
        raise ConfigError("profile power method rapl needs energy_path and max_energy_path")
    energy = PurePosixPath(spec.energy_path)
    maximum = PurePosixPath(spec.max_energy_path)
    if (
        energy.name != "energy_uj"
        or maximum.name != "max_energy_range_uj"
        or energy.parent != maximum.parent
        or energy.parent.parent != _POWERCAP
    ):
        raise ConfigError(
            f"profile rapl paths {spec.energy_path} and {spec.max_energy_path} must be "
            f"{_POWERCAP}/<zone>/energy_uj and .../max_energy_range_uj of the same zone"
        )
    return energy.parent.name


def power_params(spec: PowerSpec, root: Path, config: SensorConfig | None = None) -> PowerParams:
    """The profile's ``[power]`` table as reader parameters (pure apart from command lookup)."""
    cfg = config or SensorConfig()
    params = PowerParams(
        idle_w=spec.idle_w, load_w=spec.load_w, command_timeout_s=cfg.command_timeout_s
    )
    if spec.method == "hwmon_ina3221" and spec.total_rail:
        params = replace(params, hwmon_total_rail=spec.total_rail)
    elif spec.method == "iio_ina3221x" and spec.total_rail:
        params = replace(params, iio_total_rail=spec.total_rail)
    elif spec.method == "rpi5_pmic":
        name = _command_path(spec.command, ("pmic_read_adc",), "[power] command")
        params = replace(params, vcgencmd_path=resolve_command(name, root, cfg))
    elif spec.method == "rapl":
        params = replace(params, rapl_zone=_rapl_zone(spec))
    return params


def make_power(spec: PowerSpec, root: Path, config: SensorConfig | None = None) -> PowerReader:
    """The profile's power reader, falling back to the labelled estimate when it fails."""
    return make_resilient_power_reader(spec.method, root, power_params(spec, root, config))


class ProfileThermalReader(ThermalReader):
    """``ThermalReader`` plus the profile's extra temperature files (Edge TPU die, ...)."""

    def __init__(
        self,
        root: str | Path,
        zones_glob: str,
        throttle_method: str,
        *,
        cpufreq_glob: str | None,
        vcgencmd_path: str,
        command_timeout_s: float,
        extra_temp_paths: tuple[str, ...] = (),
    ) -> None:
        super().__init__(
            root, zones_glob, throttle_method, cpufreq_glob=cpufreq_glob,
            vcgencmd_path=vcgencmd_path, command_timeout_s=command_timeout_s,
        )
        self.extra_temp_paths = extra_temp_paths

    def read(self) -> ThermalSample:
        sample = super().read()
        if not self.extra_temp_paths:
            return sample
        zones = dict(sample.zones_c)
        errors = list(sample.errors)
        for raw in self.extra_temp_paths:
            path = under(self.root, raw)
            try:
                zones[extra_zone_name(raw)] = read_int(path, "temperature") / 1000.0
            except SensorError as err:
                errors.append(str(err))
                if str(err) not in self._logged:
                    self._logged.add(str(err))
                    log.warning("thermal: %s", err)
        return replace(sample, zones_c=zones, errors=tuple(errors))


def extra_zone_name(path: str) -> str:
    """``/sys/class/apex/apex_0/temp`` -> ``apex_0``: the device the file belongs to."""
    pure = PurePosixPath(path)
    return pure.parent.name if pure.name in ("temp", "temp1_input") else pure.name


def cpufreq_glob(spec: ThermalSpec, root: Path) -> str:
    """All cpufreq policies when the tree has them (each big.LITTLE cluster has its own
    cap), else the profile's single cpufreq directory."""
    if any(Path(root).glob(CPUFREQ_GLOB)):
        return CPUFREQ_GLOB
    return spec.cpufreq_path


def make_thermal(
    spec: ThermalSpec, root: Path, config: SensorConfig | None = None
) -> ProfileThermalReader:
    cfg = config or SensorConfig()
    if spec.throttle_method not in _THROTTLE:
        raise ConfigError(f"unknown throttle method {spec.throttle_method!r} in profile")
    vcgencmd = "vcgencmd"
    if spec.throttle_method == "vcgencmd":
        name = _command_path(
            spec.throttle_command, ("get_throttled",), "[thermal] throttle_command"
        )
        vcgencmd = resolve_command(name, root, cfg)
    elif spec.throttle_method == "soctherm" and spec.oc_hwmon_name != "soctherm_oc":
        raise ConfigError(
            f"profile oc_hwmon_name {spec.oc_hwmon_name!r} is not supported; the soctherm "
            "reader finds the hwmon named 'soctherm_oc'"
        )
    return ProfileThermalReader(
        root,
        spec.zones_glob,
        _THROTTLE[spec.throttle_method],
        cpufreq_glob=cpufreq_glob(spec, root),
        vcgencmd_path=vcgencmd,
        command_timeout_s=cfg.command_timeout_s,
        extra_temp_paths=spec.extra_temp_paths,
    )


def sampler_config(
    spec: PowerSpec, window_s: float | None, config: SensorConfig | None = None
) -> SamplerConfig:
    """The profile's interval, shortened only when a telemetry window would get too few samples."""
    cfg = config or SensorConfig()
    interval = spec.sample_interval_s
    thermal = cfg.thermal_interval_s
    if window_s is not None:
        if window_s <= 0:
            raise ConfigError(f"telemetry window must be > 0 s, got {window_s}")
        interval = min(interval, window_s / cfg.min_samples_per_window)
        thermal = min(thermal, window_s / cfg.min_samples_per_window)
    return SamplerConfig(
        interval_s=interval,
        thermal_interval_s=max(thermal, interval),
        join_timeout_s=cfg.join_timeout_s,
    )


def make_sampler(
    profile: Profile,
    hw_root: str | Path = "/",
    window_s: float | None = None,
    config: SensorConfig | None = None,
) -> PowerSampler:
    """A (not yet started) sampler reading this board's power and thermal sensors."""
    root = Path(hw_root)
    power = make_power(profile.power, root, config)
    thermal = make_thermal(profile.thermal, root, config)
    sampler = PowerSampler(power, thermal, sampler_config(profile.power, window_s, config))
    log.info(
        "power: %s under %s every %.2fs (estimate fallback %g-%g W); thermal: %s",
        profile.power.method, root, sampler.config.interval_s,
        profile.power.idle_w, profile.power.load_w, profile.thermal.throttle_method,
    )
    return sampler


def idle_mw(profile: Profile) -> float:
    """The board's idle draw in mW, the baseline of "mJ per inference above idle"."""
    return profile.power.idle_w * 1000.0

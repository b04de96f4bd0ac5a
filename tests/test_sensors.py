"""Firmware profile -> power/thermal readers and sampler, on the fake board trees.

Every test runs the real readers against the trees under tests/boards and
tests/sysfs (copied to tmp_path before anything is broken), with the shipped
firmware profiles.
"""

from __future__ import annotations

import shutil
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from agent.common.errors import ConfigError
from agent.profiles.schema import Profile, load_profiles
from agent.telemetry.power.rpi5_pmic import pmic_sample
from agent.telemetry.sampler import PowerWindow
from agent.telemetry.sensors import (
    SensorConfig,
    extra_zone_name,
    idle_mw,
    make_power,
    make_sampler,
    make_thermal,
    resolve_command,
    sampler_config,
)

TESTS = Path(__file__).parent
BOARDS = TESTS / "boards"
SYSFS = TESTS / "sysfs"
CAPTURED = SYSFS / "rpi5" / "vcgencmd"
PROFILES = load_profiles()


def board(tmp_path: Path, name: str, source: Path = BOARDS) -> Path:
    return Path(shutil.copytree(source / name, tmp_path / name, symlinks=True))


def one_window(profile: Profile, root: Path) -> PowerWindow:
    sampler = make_sampler(profile, root, window_s=10.0)
    sampler.sample_once(thermal=True)
    return sampler.window()


def install_vcgencmd(root: Path, throttled: str = "get_throttled_undervoltage.txt") -> Path:
    """A stand-in vcgencmd in the fake board's /usr/bin, replaying captured output."""
    script = root / "usr" / "bin" / "vcgencmd"
    script.parent.mkdir(parents=True)
    script.write_text(
        "#!/bin/sh\n"
        f"[ \"$1\" = pmic_read_adc ] && exec cat '{CAPTURED / 'pmic_read_adc.txt'}'\n"
        f"[ \"$1\" = get_throttled ] && exec cat '{CAPTURED / throttled}'\n"
        "echo 'error=2 error_msg=\"Command not registered\"'\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_shipped_profile_builds_sensors_on_its_board_tree(name: str) -> None:
    window = one_window(PROFILES[name], BOARDS / name)
    assert window.samples == 1
    assert window.source in ("sensor", "estimate")
    assert window.mean_mw is not None and window.mean_mw >= 0
    assert window.thermal is not None and window.thermal.zones_c
    assert window.max_temp_c == max(window.thermal.zones_c.values())


def test_jetson_orin_nano_uses_vdd_in_and_soctherm() -> None:
    window = one_window(PROFILES["jetson-orin-nano"], BOARDS / "jetson-orin-nano")
    assert (window.source, window.detail) == ("sensor", "hwmon_ina3221 VDD_IN")
    assert window.mean_mw == pytest.approx(5016 * 1232 / 1000)
    assert window.thermal is not None
    assert window.thermal.oc_events == {"oc1": 0, "oc2": 0, "oc3": 27}
    assert window.thermal.oc_events_new == 0  # first read: counts since boot are not "new"
    assert window.thermal.cpufreq is not None and window.thermal.cpufreq.ratio == 1.0
    assert window.throttled is False


def test_agx_orin_sums_connected_rails_without_vdd_in() -> None:
    window = one_window(PROFILES["jetson-agx-orin"], BOARDS / "jetson-agx-orin")
    assert window.source == "sensor"
    assert window.detail is not None and window.detail.startswith("hwmon_ina3221 sum(")
    assert "NC" not in window.detail.removeprefix("hwmon_ina3221 sum(").rstrip(")").split("+")


def test_jetson_nano_iio_total_rail() -> None:
    window = one_window(PROFILES["jetson-nano"], BOARDS / "jetson-nano")
    assert (window.source, window.detail) == ("sensor", "iio_ina3221x POM_5V_IN")
    assert window.mean_mw == 3105.0
    assert window.thermal is not None
    # The profile asks for soctherm_oc, which this JetPack 4 tree lacks: zones still read.
    assert any("soctherm_oc" in e for e in window.thermal.errors)
    assert window.thermal.zones_c["PMIC-Die"] == 100.0


def test_x86_rapl_deltas_from_the_fake_counter(tmp_path: Path) -> None:
    root = board(tmp_path, "x86-gateway")
    counter = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    reader = make_power(PROFILES["x86-gateway"].power, root)
    first = reader.read()  # primes, then a still counter: zero power, still a sensor
    assert (first.source, first.mw) == ("sensor", 0.0)
    assert first.detail.startswith("rapl intel-rapl:0")
    counter.write_text(str(int(counter.read_text()) + 1_000_000))
    assert reader.read().mw > 0


def test_rpi5_without_vcgencmd_in_the_tree_falls_back_to_the_labelled_estimate() -> None:
    profile = PROFILES["rpi5"]
    window = one_window(profile, BOARDS / "rpi5")
    assert window.source == "estimate"
    assert window.detail is not None
    assert window.detail.startswith("linear(idle_w=2.7,load_w=7)")
    assert "fallback: rpi5_pmic failed" in window.detail
    assert window.mean_mw is not None
    assert profile.power.idle_w * 1000 <= window.mean_mw <= profile.power.load_w * 1000
    assert window.thermal is not None and window.thermal.zones_c  # zones need no vcgencmd
    assert any("command not found" in e for e in window.thermal.errors)


def test_rpi5_runs_the_vcgencmd_of_its_tree(tmp_path: Path) -> None:
    root = board(tmp_path, "rpi5")
    install_vcgencmd(root)
    window = one_window(PROFILES["rpi5"], root)
    expected = pmic_sample((CAPTURED / "pmic_read_adc.txt").read_text())
    assert (window.source, window.detail) == ("sensor", "rpi5_pmic (on-board rails)")
    assert window.mean_mw == pytest.approx(expected.mw)
    assert window.thermal is not None and window.thermal.throttle is not None
    assert window.thermal.throttle.since_boot == {"under_voltage", "throttled"}
    assert window.throttled is True
    assert window.throttle_flags == ("under_voltage", "throttled")


def test_garbage_sensor_file_falls_back_then_recovers(tmp_path: Path) -> None:
    root = board(tmp_path, "jetson-orin-nano")
    current = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1/curr1_input"
    sampler = make_sampler(PROFILES["jetson-orin-nano"], root)
    current.write_bytes(b"\xff\xfe garbage")
    sampler.sample_once()
    broken = sampler.window()
    assert broken.source == "estimate"
    assert broken.detail is not None and "fallback: hwmon_ina3221 failed" in broken.detail
    error = getattr(sampler.power, "last_error", None)
    assert error is not None and "curr1_input" in str(error)
    current.write_text("1232\n")
    sampler.sample_once()
    assert sampler.window().source == "sensor"


def test_missing_sensor_falls_back(tmp_path: Path) -> None:
    root = board(tmp_path, "jetson-nano")
    shutil.rmtree(root / "sys/bus/i2c/drivers/ina3221x")
    window = one_window(PROFILES["jetson-nano"], root)
    assert window.source == "estimate"
    assert window.detail is not None and "fallback: iio_ina3221x failed" in window.detail


def test_mixed_window_is_labelled_estimate(tmp_path: Path) -> None:
    root = board(tmp_path, "jetson-orin-nano")
    sampler = make_sampler(PROFILES["jetson-orin-nano"], root)
    sampler.sample_once()
    (root / "sys/class/hwmon/hwmon1").unlink()
    sampler.sample_once()
    window = sampler.window()
    assert window.samples == 2
    assert window.source == "estimate"  # "sensor" only when every sample was


def test_estimate_profile_and_extra_temperature_file() -> None:
    window = one_window(PROFILES["coral-devboard"], BOARDS / "coral-devboard")
    assert (window.source, window.detail) == ("estimate", "linear(idle_w=3,load_w=6.5)")
    assert window.thermal is not None
    assert window.thermal.zones_c["apex_0"] == 42.3


def test_broken_extra_temperature_file_is_reported_not_fatal(tmp_path: Path) -> None:
    root = board(tmp_path, "coral-devboard")
    (root / "sys/class/apex/apex_0/temp").write_text("hot\n")
    sample = make_thermal(PROFILES["coral-devboard"].thermal, root).read()
    assert "apex_0" not in sample.zones_c
    assert sample.zones_c  # the thermal zones are still there
    assert any("apex_0/temp" in e and "'hot'" in e for e in sample.errors)


def test_cpufreq_cap_across_policies() -> None:
    window = one_window(PROFILES["jetson-agx-orin"], SYSFS / "jetson_agx_orin")
    assert window.thermal is not None and window.thermal.cpufreq is not None
    assert set(window.thermal.cpufreq.policies) == {"policy0", "policy4", "policy8"}
    assert window.thermal.cpufreq.ratio < 1.0
    assert "cpufreq_capped" in window.throttle_flags


def test_commands_resolve_inside_a_fake_root_only(tmp_path: Path) -> None:
    assert resolve_command("vcgencmd", Path("/")) == "vcgencmd"  # $PATH on the device
    assert resolve_command("/usr/bin/vcgencmd", Path("/")) == "/usr/bin/vcgencmd"
    root = board(tmp_path, "rpi5")
    missing = resolve_command("vcgencmd", root)
    assert missing.startswith(str(root)) and not Path(missing).exists()
    script = install_vcgencmd(root)
    assert resolve_command("vcgencmd", root) == str(script)
    assert resolve_command("/usr/bin/vcgencmd", root) == str(script)


def test_profile_fields_the_readers_cannot_honour_are_config_errors() -> None:
    x86, rpi5, orin = PROFILES["x86-gateway"], PROFILES["rpi5"], PROFILES["jetson-orin-nano"]
    elsewhere = replace(x86.power, energy_path="/sys/class/hwmon/hwmon0/energy_uj")
    with pytest.raises(ConfigError, match="powercap"):
        make_power(elsewhere, Path("/"))
    two_zones = replace(
        x86.power, max_energy_path="/sys/class/powercap/intel-rapl:1/max_energy_range_uj"
    )
    with pytest.raises(ConfigError, match="same zone"):
        make_power(two_zones, Path("/"))
    with pytest.raises(ConfigError, match="pmic_read_adc"):
        make_power(replace(rpi5.power, command=("vcgencmd", "measure_temp")), Path("/"))
    with pytest.raises(ConfigError, match="get_throttled"):
        make_thermal(replace(rpi5.thermal, throttle_command=("vcgencmd",)), Path("/"))
    with pytest.raises(ConfigError, match="oc_hwmon_name"):
        make_thermal(replace(orin.thermal, oc_hwmon_name="tegra_oc"), Path("/"))
    with pytest.raises(ConfigError, match="throttle method"):
        make_thermal(replace(orin.thermal, throttle_method="smoke-signals"), Path("/"))


def test_sampler_interval_follows_the_profile_unless_the_window_is_short() -> None:
    spec = PROFILES["rpi5"].power  # 1 s: vcgencmd forks, so not faster on a 10 s window
    normal = sampler_config(spec, window_s=10.0)
    assert (normal.interval_s, normal.thermal_interval_s) == (1.0, 5.0)
    short = sampler_config(spec, window_s=0.5)
    assert short.interval_s == 0.25 and short.thermal_interval_s == 0.25
    assert sampler_config(spec, None).interval_s == spec.sample_interval_s
    with pytest.raises(ConfigError):
        sampler_config(spec, window_s=0.0)
    with pytest.raises(ConfigError):
        SensorConfig(min_samples_per_window=0)


def test_idle_baseline_and_zone_names() -> None:
    assert idle_mw(PROFILES["rpi5"]) == pytest.approx(2700.0)
    assert extra_zone_name("/sys/class/apex/apex_0/temp") == "apex_0"
    assert extra_zone_name("/sys/class/hwmon/hwmon2/temp1_input") == "hwmon2"
    assert extra_zone_name("/sys/devices/virtual/tpu_temp") == "tpu_temp"


def test_started_sampler_thread_fills_windows(tmp_path: Path) -> None:
    sampler = make_sampler(PROFILES["jetson-orin-nano"], BOARDS / "jetson-orin-nano", 0.1)
    with sampler:
        sampler.sample_once()  # at least one sample even if the thread has not run yet
    assert not sampler.running
    window = sampler.window()
    assert window.samples >= 1 and window.source == "sensor"

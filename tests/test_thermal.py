"""Thermal zones, Pi throttle bits, Jetson soctherm_oc counters and the cpufreq cap."""

from __future__ import annotations

import logging
import shutil
import stat
from pathlib import Path

import pytest

from agent.common.errors import ConfigError, SensorError
from agent.telemetry.thermal import (
    ThermalConfig,
    ThermalReader,
    decode_throttled,
    oc_increase,
    parse_get_throttled,
    read_cpufreq_cap,
    read_soctherm_oc,
    read_zones,
)

SYSFS = Path(__file__).parent / "sysfs"
CAPTURED = SYSFS / "rpi5" / "vcgencmd"


def board(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(SYSFS / name, tmp_path / name))


def fake_vcgencmd(tmp_path: Path, throttled_file: str) -> Path:
    """A stand-in ``vcgencmd`` that replays a captured get_throttled answer."""
    script = tmp_path / "vcgencmd"
    script.write_text(
        f'#!/bin/sh\n[ "$1" = get_throttled ] && exec cat \'{CAPTURED / throttled_file}\'\n'
        "echo 'error=2 error_msg=\"Command not registered\"'\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_zones_by_type_in_celsius() -> None:
    temps, errors = read_zones(SYSFS / "jetson_nano")
    assert errors == []
    assert temps["CPU-therm"] == 33.5
    assert temps["PMIC-Die"] == 100.0
    assert next(iter(temps)) == "AO-therm"


def test_duplicate_zone_types_get_distinct_keys() -> None:
    temps, _ = read_zones(SYSFS / "x86_gateway")
    assert temps == {
        "acpitz": 27.8, "acpitz@thermal_zone1": 29.8, "x86_pkg_temp": 45.0,
        "pch_cannonlake": 41.0,
    }


def test_one_garbage_zone_does_not_hide_the_others(tmp_path: Path) -> None:
    root = board(tmp_path, "jetson_orin_nano")
    (root / "sys/class/thermal/thermal_zone1/temp").write_text("busy\n")
    temps, errors = read_zones(root)
    assert "gpu-thermal" not in temps and temps["cpu-thermal"] == 47.968
    assert len(errors) == 1 and "thermal_zone1/temp holds 'busy'" in errors[0]


def test_no_readable_zone_is_an_error(tmp_path: Path) -> None:
    root = board(tmp_path, "rpi5")
    (root / "sys/class/thermal/thermal_zone0/temp").unlink()
    with pytest.raises(SensorError, match=r"no readable zone .*temp does not exist"):
        read_zones(root)
    with pytest.raises(SensorError, match="no zone matches"):
        read_zones(tmp_path / "empty")


@pytest.mark.parametrize(
    ("text", "now", "since"),
    [("throttled=0x0", set(), set()),
     ("throttled=0x50005\n", {"under_voltage", "throttled"}, {"under_voltage", "throttled"}),
     ("throttled=0xe0000", set(), {"freq_capped", "throttled", "soft_temp_limit"}),
     ("throttled=0x8", {"soft_temp_limit"}, set())],
)
def test_get_throttled_bits(text: str, now: set[str], since: set[str]) -> None:
    state = parse_get_throttled(text)
    assert state.now == now and state.since_boot == since


@pytest.mark.parametrize("text", ["", "throttled=", "throttled=50005", "temp=51.0'C"])
def test_get_throttled_garbage(text: str) -> None:
    with pytest.raises(SensorError, match=r"expected 'throttled=0x\.\.\.'"):
        parse_get_throttled(text)


def test_pi5_reader_with_fake_vcgencmd(tmp_path: Path) -> None:
    script = fake_vcgencmd(tmp_path, "get_throttled_undervoltage.txt")
    reader = ThermalReader(SYSFS / "rpi5", throttle_method="vcgencmd", vcgencmd_path=str(script))
    sample = reader.read()
    assert sample.zones_c == {"cpu-thermal": 51.75}
    assert sample.throttle == decode_throttled(0x50005)
    assert sample.flags == ("under_voltage", "throttled")
    assert sample.throttled is True
    assert sample.errors == ()
    calm = ThermalReader(
        SYSFS / "rpi5", throttle_method="vcgencmd",
        vcgencmd_path=str(fake_vcgencmd(tmp_path, "get_throttled.txt")),
    ).read()
    assert calm.throttled is False and calm.to_dict()["since_boot"] == []


def test_jetson_soctherm_counters_and_new_events(tmp_path: Path) -> None:
    root = board(tmp_path, "jetson_orin_nano")
    assert read_soctherm_oc(root) == {"oc1": 0, "oc2": 3, "oc3": 0}
    reader = ThermalReader(root, throttle_method="soctherm_oc")
    first = reader.read()
    assert first.oc_events_new == 0 and first.throttled is False  # since-boot events are old
    (root / "sys/class/hwmon/hwmon1/oc1_event_cnt").write_text("2\n")
    second = reader.read()
    assert second.oc_events_new == 2
    assert second.flags == ("soctherm_oc",)
    assert second.max_c == pytest.approx(47.968)


def test_oc_increase_survives_a_counter_reset() -> None:
    assert oc_increase(None, {"oc1": 9}) == 0
    assert oc_increase({"oc1": 5, "oc2": 1}, {"oc1": 7, "oc2": 1}) == 2
    assert oc_increase({"oc1": 5}, {"oc1": 1}) == 1


def test_soctherm_missing_or_garbage(tmp_path: Path) -> None:
    with pytest.raises(SensorError, match="no hwmon named 'soctherm_oc'"):
        read_soctherm_oc(SYSFS / "rpi5")
    root = board(tmp_path, "jetson_agx_orin")
    (root / "sys/class/hwmon/hwmon3/oc2_event_cnt").write_text("0x1\n")
    with pytest.raises(SensorError, match="oc2_event_cnt holds '0x1'"):
        read_soctherm_oc(root)


def test_cpufreq_cap() -> None:
    nano = read_cpufreq_cap(SYSFS / "jetson_orin_nano")
    assert nano.ratio == 1.0 and not nano.capped
    agx = read_cpufreq_cap(SYSFS / "jetson_agx_orin")
    assert agx.capped and agx.ratio == pytest.approx(1728000 / 2201600)
    assert agx.policies["policy8"] == (1728000, 2201600)


def test_cpufreq_garbage(tmp_path: Path) -> None:
    root = board(tmp_path, "rpi5")
    policy = root / "sys/devices/system/cpu/cpufreq/policy0"
    (policy / "cpuinfo_max_freq").write_text("0\n")
    with pytest.raises(SensorError, match="non-positive"):
        read_cpufreq_cap(root)
    (policy / "scaling_max_freq").write_text("fast\n")
    with pytest.raises(SensorError, match="scaling_max_freq holds 'fast'"):
        read_cpufreq_cap(root)


def test_reader_keeps_what_works_and_logs_each_failure_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = board(tmp_path, "jetson_agx_orin")
    for zone in (root / "sys/class/thermal").glob("thermal_zone*"):
        (zone / "temp").write_bytes(b"\x00\xff")
    reader = ThermalReader.from_config(ThermalConfig(root=str(root), throttle_method="soctherm_oc"))
    with caplog.at_level(logging.WARNING, logger="agent.telemetry.thermal"):
        samples = [reader.read() for _ in range(3)]
    sample = samples[-1]
    assert sample.zones_c == {} and sample.max_c is None
    assert sample.cpufreq is not None and sample.cpufreq.capped
    assert sample.flags == ("cpufreq_capped",)
    assert len(sample.errors) == 1 and "binary garbage" in sample.errors[0]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_no_throttle_source_means_unknown(tmp_path: Path) -> None:
    sample = ThermalReader(SYSFS / "x86_gateway", cpufreq_glob=None).read()
    assert sample.throttled is None and sample.flags == ()
    assert sample.to_dict()["max_c"] == 45.0


def test_unknown_throttle_method() -> None:
    with pytest.raises(ConfigError, match="unknown throttle method 'tegrastats'"):
        ThermalReader(SYSFS / "rpi5", throttle_method="tegrastats")


def test_missing_vcgencmd_is_reported_in_the_sample(tmp_path: Path) -> None:
    reader = ThermalReader(
        SYSFS / "rpi5", throttle_method="vcgencmd", vcgencmd_path=str(tmp_path / "missing")
    )
    sample = reader.read()
    assert sample.throttle is None and sample.zones_c == {"cpu-thermal": 51.75}
    assert any("command not found" in e for e in sample.errors)

"""hwmon_ina3221 and iio_ina3221x readers on fake Jetson trees."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from agent.common.errors import SensorError
from agent.telemetry.power import (
    HwmonIna3221Reader,
    IioIna3221xReader,
    make_power_reader,
    make_resilient_power_reader,
)
from agent.telemetry.power.hwmon_ina3221 import is_skipped_label
from agent.telemetry.power.sysfs import find_hwmon

SYSFS = Path(__file__).parent / "sysfs"


def board(tmp_path: Path, name: str) -> Path:
    """A private copy of a fake board tree that the test may break."""
    return Path(shutil.copytree(SYSFS / name, tmp_path / name))


def test_orin_nano_uses_vdd_in_only() -> None:
    sample = HwmonIna3221Reader(SYSFS / "jetson_orin_nano").read()
    assert sample.source == "sensor"
    assert sample.mw == pytest.approx(5072 * 1152 / 1000)
    assert sample.detail == "hwmon_ina3221 VDD_IN"
    assert sample.label == "sensor:hwmon_ina3221 VDD_IN"
    labels = [name for name, _ in sample.rails]
    assert labels == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]  # sum-of-shunts skipped


def test_agx_orin_sums_rails_across_both_monitors_and_skips_nc() -> None:
    sample = make_power_reader("hwmon_ina3221", SYSFS / "jetson_agx_orin").read()
    expected = (19112 * 240 + 19112 * 56 + 4992 * 872 + 4984 * 128) / 1000
    assert sample.mw == pytest.approx(expected)
    assert [name for name, _ in sample.rails] == [
        "VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO",
    ]
    assert "NC" not in sample.detail and sample.detail.startswith("hwmon_ina3221 sum(")


def test_total_rail_is_configurable(tmp_path: Path) -> None:
    sample = make_power_reader(
        "hwmon_ina3221", SYSFS / "jetson_orin_nano", {"hwmon_total_rail": "VDD_SOC"}
    ).read()
    assert sample.mw == pytest.approx(5072 * 688 / 1000)


@pytest.mark.parametrize(
    ("label", "skipped"),
    [("NC", True), ("Sum of shunt voltages", True), ("VDD_IN", False),
     ("VIN_SYS_5V0", False), ("NC_2", True), ("VDD_SYNC", False)],
)
def test_skipped_labels(label: str, skipped: bool) -> None:
    assert is_skipped_label(label) is skipped


def test_missing_current_file_is_a_clear_error(tmp_path: Path) -> None:
    root = board(tmp_path, "jetson_orin_nano")
    (root / "sys/class/hwmon/hwmon3/curr1_input").unlink()
    with pytest.raises(SensorError, match=r"VDD_IN current: .*curr1_input does not exist"):
        HwmonIna3221Reader(root).read()


@pytest.mark.parametrize("garbage", [b"garbage\n", b"", b"\xff\xfe\x00", b"12.5\n"])
def test_garbage_voltage_is_a_clear_error(tmp_path: Path, garbage: bytes) -> None:
    root = board(tmp_path, "jetson_orin_nano")
    (root / "sys/class/hwmon/hwmon3/in1_input").write_bytes(garbage)
    with pytest.raises(SensorError, match=r"in1_input"):
        HwmonIna3221Reader(root).read()


def test_no_ina3221_hwmon_is_a_clear_error() -> None:
    with pytest.raises(SensorError, match="no hwmon named 'ina3221'"):
        HwmonIna3221Reader(SYSFS / "rpi5").read()


def test_broken_sensor_falls_back_to_estimate_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = board(tmp_path, "jetson_orin_nano")
    current = root / "sys/class/hwmon/hwmon3/curr1_input"
    current.write_text("not-a-number\n")
    reader = make_resilient_power_reader(
        "hwmon_ina3221", root, {"idle_w": 3.0, "load_w": 10.0}
    )
    with caplog.at_level(logging.WARNING, logger="agent.telemetry.power"):
        samples = [reader.read() for _ in range(3)]
    assert all(s.source == "estimate" for s in samples)
    assert all(3000.0 <= s.mw <= 10000.0 for s in samples)
    assert "fallback: hwmon_ina3221 failed" in samples[0].label
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "expected an integer" in warnings[0].getMessage()
    current.write_text("1152\n")  # the sensor comes back
    assert reader.read().source == "sensor"


def test_jetson_nano_iio_uses_pom_5v_in() -> None:
    sample = IioIna3221xReader(SYSFS / "jetson_nano").read()
    assert sample.mw == 2440.0
    assert sample.label == "sensor:iio_ina3221x POM_5V_IN"
    assert [name for name, _ in sample.rails] == ["POM_5V_IN", "POM_5V_GPU", "POM_5V_CPU"]


def test_iio_without_total_rail_sums_the_rest(tmp_path: Path) -> None:
    root = board(tmp_path, "jetson_nano")
    device = root / "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    (device / "rail_name_0").unlink()
    sample = make_power_reader("iio_ina3221x", root).read()
    assert sample.mw == 39 + 485
    assert sample.detail == "iio_ina3221x sum(POM_5V_GPU+POM_5V_CPU)"


def test_iio_garbage_and_missing(tmp_path: Path) -> None:
    root = board(tmp_path, "jetson_nano")
    device = root / "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    (device / "in_power2_input").write_text("-\n")
    with pytest.raises(SensorError, match=r"POM_5V_CPU power: .*expected an integer"):
        IioIna3221xReader(root).read()
    (device / "in_power2_input").unlink()
    with pytest.raises(SensorError, match="in_power2_input does not exist"):
        IioIna3221xReader(root).read()
    with pytest.raises(SensorError, match="no IIO device"):
        IioIna3221xReader(SYSFS / "jetson_orin_nano").read()


def test_iio_missing_device_falls_back_to_estimate(tmp_path: Path) -> None:
    reader = make_resilient_power_reader("iio_ina3221x", tmp_path, {"idle_w": 1.0, "load_w": 4.0})
    sample = reader.read()
    assert sample.source == "estimate"
    assert sample.label.startswith("estimate:linear(idle_w=1,load_w=4)")


def test_hwmon_devices_are_found_in_numeric_order(tmp_path: Path) -> None:
    for n in (10, 2, 9):
        device = tmp_path / f"sys/class/hwmon/hwmon{n}"
        device.mkdir(parents=True)
        (device / "name").write_text("ina3221\n")
    (tmp_path / "sys/class/hwmon/hwmon3").mkdir()  # no name file: ignored
    assert [p.name for p in find_hwmon(tmp_path, "ina3221")] == ["hwmon2", "hwmon9", "hwmon10"]

"""rpi5_pmic reader: pure parsing of captured output, and a fake ``vcgencmd`` script."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent.common.errors import SensorError
from agent.telemetry.power import Rpi5PmicReader, make_power_reader, make_resilient_power_reader
from agent.telemetry.power.rpi5_pmic import parse_pmic_read_adc, pmic_sample

CAPTURED = Path(__file__).parent / "sysfs" / "rpi5" / "vcgencmd"
PMIC_TEXT = (CAPTURED / "pmic_read_adc.txt").read_text()


def fake_vcgencmd(tmp_path: Path, body: str) -> Path:
    """A stand-in ``vcgencmd`` executable: a shell script with ``body``."""
    script = tmp_path / "vcgencmd"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def replaying_vcgencmd(tmp_path: Path) -> Path:
    return fake_vcgencmd(
        tmp_path,
        f'case "$1" in\n'
        f"  pmic_read_adc) cat '{CAPTURED / 'pmic_read_adc.txt'}' ;;\n"
        f"  get_throttled) cat '{CAPTURED / 'get_throttled.txt'}' ;;\n"
        f'  *) echo \'error=2 error_msg="Command not registered"\' ;;\n'
        f"esac",
    )


def test_parse_pairs_current_and_voltage_by_rail() -> None:
    pairs = parse_pmic_read_adc(PMIC_TEXT)
    assert len(pairs) == 12  # EXT5V_V and BATT_V have no current reading
    assert "EXT5V" not in pairs and "BATT" not in pairs
    assert pairs["VDD_CORE"] == (0.72040000, 0.81900000)
    assert pairs["3V7_WL_SW"] == (3.74704000, 0.00390372)


def test_sample_sums_v_times_a_and_is_labelled_on_board() -> None:
    sample = pmic_sample(PMIC_TEXT)
    assert sample.mw == pytest.approx(1745.5712, abs=1e-3)
    assert dict(sample.rails)["VDD_CORE"] == pytest.approx(0.7204 * 0.819 * 1000)
    assert sample.label == "sensor:rpi5_pmic (on-board rails)"


@pytest.mark.parametrize(
    "text",
    ["", "garbage\n", 'error=2 error_msg="Command not registered"\n',
     "   VDD_CORE_A current(7)=0.81900000A\n",  # current without voltage
     "   VDD_CORE_A current(7)=0.8V\n     VDD_CORE_V volt(15)=0.72A\n"],  # swapped units
)
def test_garbage_output_is_a_clear_error(text: str) -> None:
    with pytest.raises(SensorError, match="rpi5_pmic: no rail with both current and voltage"):
        parse_pmic_read_adc(text)


def test_reader_runs_the_configured_command(tmp_path: Path) -> None:
    path = replaying_vcgencmd(tmp_path)
    reader = make_power_reader("rpi5_pmic", "/", {"vcgencmd_path": str(path)})
    sample = reader.read()
    assert sample.source == "sensor"
    assert sample.mw == pytest.approx(pmic_sample(PMIC_TEXT).mw)


def test_missing_command(tmp_path: Path) -> None:
    with pytest.raises(SensorError, match="command not found"):
        Rpi5PmicReader(tmp_path / "no-such-vcgencmd").read()


def test_failing_command_reports_its_stderr(tmp_path: Path) -> None:
    path = fake_vcgencmd(tmp_path, "echo 'VCHI initialization failed' >&2\nexit 1")
    with pytest.raises(SensorError, match="exit status 1: VCHI initialization failed"):
        Rpi5PmicReader(path).read()


def test_firmware_without_pmic_command(tmp_path: Path) -> None:
    # A Pi 4 firmware answers an unknown command with error=...
    path = fake_vcgencmd(tmp_path, "echo 'error=2 error_msg=\"Command not registered\"'")
    with pytest.raises(SensorError, match="firmware refused"):
        Rpi5PmicReader(path).read()


def test_hanging_command_times_out(tmp_path: Path) -> None:
    path = fake_vcgencmd(tmp_path, "exec sleep 5")
    with pytest.raises(SensorError, match="no answer within"):
        Rpi5PmicReader(path, timeout_s=0.2).read()


def test_garbage_from_command_falls_back_to_estimate(tmp_path: Path) -> None:
    path = fake_vcgencmd(tmp_path, "echo '#@!'")
    reader = make_resilient_power_reader(
        "rpi5_pmic", "/", {"vcgencmd_path": str(path), "idle_w": 2.7, "load_w": 7.0}
    )
    sample = reader.read()
    assert sample.source == "estimate"
    assert 2700.0 <= sample.mw <= 7000.0
    assert "fallback: rpi5_pmic failed" in sample.detail

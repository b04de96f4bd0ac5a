"""Power sampler windows and energy per inference, on fake board trees."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from agent.common.errors import ConfigError
from agent.telemetry.power import HwmonIna3221Reader, make_resilient_power_reader
from agent.telemetry.sampler import PowerSampler, SamplerConfig, energy_per_inference
from agent.telemetry.thermal import ThermalReader

SYSFS = Path(__file__).parent / "sysfs"


class SimClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def orin(tmp_path: Path) -> Path:
    return Path(shutil.copytree(SYSFS / "jetson_orin_nano", tmp_path / "orin"))


def set_vdd_in_ma(root: Path, ma: int) -> None:
    (root / "sys/class/hwmon/hwmon3/curr1_input").write_text(f"{ma}\n")


def test_energy_per_inference() -> None:
    result = energy_per_inference(5000.0, 10.0, 100, idle_mw=2000.0)
    assert (result.total_mj, result.above_idle_mj) == (500.0, 300.0)
    below_idle = energy_per_inference(1500.0, 10.0, 100, idle_mw=2000.0)
    assert below_idle.above_idle_mj == 0.0
    assert energy_per_inference(5000.0, 10.0, 0, 2000.0).total_mj is None
    assert energy_per_inference(None, 10.0, 5, 2000.0).above_idle_mj is None
    with pytest.raises(ValueError, match="duration_s, inferences"):
        energy_per_inference(5000.0, -1.0, 5, 2000.0)


def test_window_aggregates_and_resets(orin: Path) -> None:
    clock = SimClock()
    sampler = PowerSampler(
        HwmonIna3221Reader(orin),
        ThermalReader(orin, throttle_method="soctherm_oc"),
        SamplerConfig(interval_s=1.0, thermal_interval_s=5.0),
        clock=clock,
    )
    for ma in (1000, 1200, 1400):
        set_vdd_in_ma(orin, ma)
        sampler.sample_once()
        clock.now += 1.0
    clock.now += 1.0
    window = sampler.window()
    mean = 5072 * 1200 / 1000
    assert window.samples == 3 and window.read_errors == 0
    assert window.mean_mw == pytest.approx(mean)
    assert window.max_mw == pytest.approx(5072 * 1400 / 1000)
    assert window.duration_s == 4.0
    assert window.energy_mj == pytest.approx(mean * 4.0)
    assert (window.source, window.detail) == ("sensor", "hwmon_ina3221 VDD_IN")
    assert window.max_temp_c == pytest.approx(47.968)
    assert window.throttled is False and window.thermal is not None
    per = window.per_inference(inferences=400, idle_mw=2000.0)
    assert per.total_mj == pytest.approx(mean * 4.0 / 400)
    assert per.above_idle_mj == pytest.approx((mean - 2000.0) * 4.0 / 400)

    fields = window.to_dict()
    assert fields["source"] == "sensor" and fields["mw"] == round(mean, 1)
    assert fields["throttle_flags"] == [] and isinstance(fields["thermal"], dict)
    assert json.loads(json.dumps(fields)) == fields

    empty = sampler.window()
    assert empty.samples == 0 and empty.mean_mw is None and empty.source is None
    assert empty.energy_mj is None and empty.per_inference(10, 2000.0).total_mj is None


def test_thermal_is_sampled_on_its_own_interval_and_throttling_sticks(orin: Path) -> None:
    clock = SimClock()
    sampler = PowerSampler(
        HwmonIna3221Reader(orin),
        ThermalReader(orin, throttle_method="soctherm_oc"),
        SamplerConfig(interval_s=1.0, thermal_interval_s=3.0),
        clock=clock,
    )
    sampler.sample_once()  # thermal baseline at t=0
    (orin / "sys/class/hwmon/hwmon1/oc3_event_cnt").write_text("4\n")
    for _ in range(5):  # t=1..5: thermal only at t=3
        clock.now += 1.0
        sampler.sample_once()
        if clock.now == 3.0 + 1000.0:
            (orin / "sys/class/hwmon/hwmon1/oc3_event_cnt").write_text("9\n")  # unseen
    window = sampler.window()
    assert window.samples == 6
    assert window.throttled is True and window.throttle_flags == ("soctherm_oc",)
    assert window.thermal is not None and window.thermal.oc_events == {"oc1": 0, "oc2": 3, "oc3": 4}


def test_sensor_lost_mid_window_marks_the_window_estimate(orin: Path) -> None:
    clock = SimClock()
    reader = make_resilient_power_reader("hwmon_ina3221", orin, {"idle_w": 3.0, "load_w": 9.0})
    sampler = PowerSampler(reader, clock=clock)
    sampler.sample_once()
    (orin / "sys/class/hwmon/hwmon3/in1_input").unlink()
    sampler.sample_once()
    clock.now += 2.0
    window = sampler.window()
    assert window.samples == 2
    assert window.source == "estimate"
    assert window.detail is not None and "fallback: hwmon_ina3221 failed" in window.detail


def test_unwrapped_sensor_errors_are_counted_not_fatal(orin: Path) -> None:
    (orin / "sys/class/hwmon/hwmon3/name").write_text("ina3221x\n")
    sampler = PowerSampler(HwmonIna3221Reader(orin), clock=SimClock())
    sampler.sample_once()
    sampler.sample_once()
    window = sampler.window()
    assert window.samples == 0 and window.read_errors == 2 and window.mean_mw is None


def test_background_thread_samples_until_stopped(orin: Path) -> None:
    sampler = PowerSampler(HwmonIna3221Reader(orin), config=SamplerConfig(interval_s=0.01))
    with sampler:
        assert sampler.running
        deadline = time.monotonic() + 20.0
        seen = 0
        while seen < 3 and time.monotonic() < deadline:
            seen += sampler.window().samples
            threading.Event().wait(0.02)
    assert seen >= 3
    assert not sampler.running


def test_bad_sampler_config() -> None:
    with pytest.raises(ConfigError, match="must be > 0"):
        SamplerConfig(interval_s=0)

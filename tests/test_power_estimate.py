"""estimate reader, power parameters and the reader factory."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.common.errors import ConfigError
from agent.telemetry.power import (
    EstimateReader,
    HwmonIna3221Reader,
    IioIna3221xReader,
    PowerParams,
    PowerSample,
    RaplReader,
    ResilientPowerReader,
    Rpi5PmicReader,
    make_power_reader,
    make_resilient_power_reader,
)
from agent.telemetry.power.estimate import CpuTimes, estimate_mw, psutil_cpu_times, utilisation


def test_linear_model() -> None:
    assert estimate_mw(2.0, 6.0, 0.0) == 2000.0
    assert estimate_mw(2.0, 6.0, 0.25) == 3000.0
    assert estimate_mw(2.0, 6.0, 1.0) == 6000.0
    with pytest.raises(ValueError, match="utilisation"):
        estimate_mw(2.0, 6.0, 1.5)


def test_utilisation_from_cpu_time_deltas() -> None:
    assert utilisation(CpuTimes(10, 100), CpuTimes(35, 150)) == 0.5
    assert utilisation(CpuTimes(10, 100), CpuTimes(10, 100)) is None


def test_reader_follows_replayed_cpu_times() -> None:
    replay = iter([CpuTimes(10, 100), CpuTimes(35, 150), CpuTimes(35, 150), CpuTimes(85, 200)])
    reader = EstimateReader(2.0, 6.0, cpu_times=lambda: next(replay))
    first = reader.read()
    assert first == PowerSample(4000.0, "estimate", "linear(idle_w=2,load_w=6)")
    assert reader.read().mw == 4000.0  # no CPU time elapsed: keep the last utilisation
    assert reader.read().mw == 6000.0


def test_reader_on_this_machine_stays_between_idle_and_load() -> None:
    busy, total = psutil_cpu_times()
    assert 0 <= busy <= total
    sample = make_power_reader("estimate", "/", {"idle_w": 1.5, "load_w": 4.0}).read()
    assert sample.source == "estimate"
    assert 1500.0 <= sample.mw <= 4000.0


def test_params_from_profile_table() -> None:
    params = PowerParams.from_mapping({"idle_w": 3, "load_w": 9.5, "vcgencmd_path": "/x/vc"})
    assert (params.idle_w, params.load_w, params.vcgencmd_path) == (3.0, 9.5, "/x/vc")
    table = {"method": "rapl", "interval_s": 1.0, "rapl_zone": "intel-rapl:1"}
    assert PowerParams.from_mapping(table, ignore=("method", "interval_s")).rapl_zone == (
        "intel-rapl:1"
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [({"idle_watts": 2.0}, "unknown power parameter"),
     ({"idle_w": "2"}, "must be a number"),
     ({"idle_w": True}, "must be a number"),
     ({"rapl_zone": 3}, "must be a non-empty string"),
     ({"idle_w": 7.0, "load_w": 3.0}, "idle_w <= load_w"),
     ({"command_timeout_s": 0}, "must be > 0")],
)
def test_bad_params_are_config_errors(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PowerParams.from_mapping(table)


def test_factory_builds_one_reader_per_method(tmp_path: Path) -> None:
    kinds = {
        "hwmon_ina3221": HwmonIna3221Reader, "iio_ina3221x": IioIna3221xReader,
        "rpi5_pmic": Rpi5PmicReader, "rapl": RaplReader, "estimate": EstimateReader,
    }
    for method, kind in kinds.items():
        reader = make_power_reader(method, tmp_path)
        assert isinstance(reader, kind)
        assert reader.method == method
    wrapped = make_resilient_power_reader("rapl", tmp_path)
    assert isinstance(wrapped, ResilientPowerReader)
    assert isinstance(make_resilient_power_reader("estimate", tmp_path), EstimateReader)
    with pytest.raises(ConfigError, match="unknown power method 'ina219'"):
        make_power_reader("ina219", tmp_path)


def test_sample_rejects_unknown_source() -> None:
    with pytest.raises(ValueError, match="sensor or estimate"):
        PowerSample(1.0, "guess")

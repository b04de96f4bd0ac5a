"""rapl reader: energy_uj deltas with wraparound, on the fake x86 tree."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.common.errors import SensorError
from agent.telemetry.power import RaplReader, make_resilient_power_reader
from agent.telemetry.power.rapl import mean_mw, rapl_delta_uj

SYSFS = Path(__file__).parent / "sysfs"
MAX_RANGE = 262143328850


def test_delta_without_and_with_wrap() -> None:
    assert rapl_delta_uj(1_000, 5_000, MAX_RANGE) == 4_000
    assert rapl_delta_uj(MAX_RANGE - 1_000, 500, MAX_RANGE) == 1_500
    assert rapl_delta_uj(7, 7, MAX_RANGE) == 0


@pytest.mark.parametrize(("prev", "cur", "max_range"), [(-1, 5, 10), (0, 11, 10), (0, 1, 0)])
def test_delta_rejects_impossible_counters(prev: int, cur: int, max_range: int) -> None:
    with pytest.raises(SensorError, match="rapl"):
        rapl_delta_uj(prev, cur, max_range)


def test_mean_mw_units() -> None:
    assert mean_mw(2_000_000, 0.5) == 4000.0  # 2 J over 0.5 s = 4 W
    with pytest.raises(SensorError, match="non-positive interval"):
        mean_mw(1, 0.0)


class CounterSimulator:
    """A package drawing a set power: advancing time advances energy_uj, wrapping."""

    def __init__(self, root: Path, watts: float) -> None:
        self.file = root / "sys/class/powercap/intel-rapl:0/energy_uj"
        self.now = 100.0
        self.watts = watts

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        energy = int(self.file.read_text()) + round(self.watts * seconds * 1e6)
        self.file.write_text(f"{energy % MAX_RANGE}\n")
        self.now += seconds


@pytest.fixture
def x86(tmp_path: Path) -> Path:
    return Path(shutil.copytree(SYSFS / "x86_gateway", tmp_path / "x86"))


def test_reader_primes_then_reports_mean_power_across_a_wrap(x86: Path) -> None:
    sim = CounterSimulator(x86, watts=12.5)
    reader = RaplReader(x86, prime_s=0.05, clock=sim.clock, sleep=sim.sleep)
    first = reader.read()
    assert first.mw == pytest.approx(12500.0)
    assert first.label == "sensor:rapl intel-rapl:0 package-0"
    sim.file.write_text(f"{MAX_RANGE - 1_000_000}\n")
    reader.read()  # resync to a counter just below the wrap
    sim.watts = 30.0
    sim.sleep(2.0)  # 60 J: the counter wraps
    assert int(sim.file.read_text()) < 60_000_000
    assert reader.read().mw == pytest.approx(30000.0)


def test_read_in_the_same_tick_repeats_the_last_sample(x86: Path) -> None:
    sim = CounterSimulator(x86, watts=8.0)
    reader = RaplReader(x86, clock=sim.clock, sleep=sim.sleep)
    assert reader.read() == reader.read()


@pytest.mark.parametrize("name", ["energy_uj", "max_energy_range_uj"])
def test_garbage_and_missing_counters(x86: Path, name: str) -> None:
    sim = CounterSimulator(x86, watts=8.0)
    target = x86 / "sys/class/powercap/intel-rapl:0" / name
    target.write_text("n/a\n")
    with pytest.raises(SensorError, match=f"{name} holds 'n/a', expected an integer"):
        RaplReader(x86, clock=sim.clock, sleep=sim.sleep).read()
    target.unlink()
    with pytest.raises(SensorError, match=f"{name} does not exist"):
        RaplReader(x86, clock=sim.clock, sleep=sim.sleep).read()


def test_counter_above_its_range_is_garbage(x86: Path) -> None:
    sim = CounterSimulator(x86, watts=8.0)
    (x86 / "sys/class/powercap/intel-rapl:0/energy_uj").write_text(f"{MAX_RANGE + 5}\n")
    with pytest.raises(SensorError, match="outside"):
        RaplReader(x86, clock=sim.clock, sleep=sim.sleep).read()


def test_board_without_rapl_falls_back_to_estimate() -> None:
    reader = make_resilient_power_reader("rapl", SYSFS / "rpi5", {"prime_s": 0.01})
    sample = reader.read()
    assert sample.source == "estimate"
    assert "fallback: rapl failed" in sample.detail

"""Log-bucket latency histogram against numpy on random data."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from agent.telemetry.histogram import HistogramConfig, LatencyHistogram

QUANTILES = (0.0, 1.0, 25.0, 50.0, 90.0, 95.0, 99.0, 99.9, 100.0)


def filled(values: np.ndarray) -> LatencyHistogram:
    hist = LatencyHistogram()
    for value in values.tolist():
        hist.record(value)
    return hist


DATASETS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    # invoke latency around 3 ms with a long tail
    "lognormal": lambda rng: rng.lognormal(math.log(3e6), 0.6, 50_000),
    "exponential": lambda rng: 5e5 + rng.exponential(2e6, 50_000),
    "uniform_wide": lambda rng: rng.uniform(2e3, 5e10, 20_000),
    "integers": lambda rng: rng.integers(1_000, 40_000_000, 20_000).astype(float),
    "bimodal": lambda rng: np.concatenate(
        [rng.normal(3e6, 1e5, 30_000), rng.normal(45e6, 3e6, 300)]
    ),
}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_percentiles_within_documented_relative_error(name: str) -> None:
    values = DATASETS[name](np.random.default_rng(1234))
    hist = filled(values)
    bound = hist.relative_error
    assert bound == pytest.approx(math.sqrt(1.02) - 1)
    for q in QUANTILES:
        # The histogram uses nearest rank, which numpy calls inverted_cdf.
        exact = float(np.percentile(values, q, method="inverted_cdf"))
        got = hist.percentile(q)
        assert got is not None
        assert abs(got - exact) / exact <= bound + 1e-12, (name, q, got, exact)
    assert hist.count == len(values)
    assert hist.max == float(values.max())
    assert hist.p50 == hist.percentile(50)
    assert hist.mean == pytest.approx(float(values.mean()))


def test_close_to_numpy_default_interpolation_too() -> None:
    values = DATASETS["lognormal"](np.random.default_rng(7))
    hist = filled(values)
    for q in (50.0, 90.0, 99.0):
        exact = float(np.percentile(values, q))
        got = hist.percentile(q)
        assert got is not None and abs(got - exact) / exact <= 0.011


def test_memory_is_fixed_by_the_bucket_layout() -> None:
    hist = LatencyHistogram()
    buckets = hist.bucket_count
    assert buckets == HistogramConfig().buckets + 2 == 907
    rng = np.random.default_rng(3)
    for value in rng.lognormal(math.log(3e6), 2.0, 100_000).tolist():
        hist.record(value)
    assert hist.bucket_count == buckets and hist.count == 100_000


def test_warmup_records_are_ignored() -> None:
    hist = LatencyHistogram(warmup=3)
    for value in (900e6, 800e6, 700e6, 3e6, 4e6):
        hist.record(value)
    assert hist.count == 2 and hist.max == 4e6 and hist.warmup_remaining == 0
    hist.reset()  # a new window does not re-arm warm-up
    hist.record(5e6)
    assert hist.count == 1


def test_out_of_range_values() -> None:
    hist = LatencyHistogram()
    hist.record(0)
    hist.record(250)
    assert hist.percentile(100) == 250.0  # under-range is reported at most min_ns, clamped
    hist.record(120e9)
    assert hist.max == 120e9 and hist.percentile(100) == 120e9
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="non-negative"):
            hist.record(bad)


def test_single_value_is_exact() -> None:
    hist = LatencyHistogram()
    hist.record(3_141_592)
    assert hist.p50 == hist.p99 == hist.max == 3_141_592


def test_empty_histogram() -> None:
    hist = LatencyHistogram()
    assert hist.percentile(50) is None and hist.max is None and hist.mean is None
    assert hist.summary_ms() == {
        "count": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None,
    }
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        hist.percentile(101)


def test_merge_equals_recording_everything() -> None:
    rng = np.random.default_rng(11)
    a_values = rng.lognormal(14.0, 0.5, 5_000)
    b_values = rng.lognormal(16.0, 0.3, 3_000)
    a, b = filled(a_values), filled(b_values)
    both = filled(np.concatenate([a_values, b_values]))
    a.merge(b)
    assert a.count == both.count
    for q in QUANTILES:
        assert a.percentile(q) == both.percentile(q)
    assert a.max == both.max
    with pytest.raises(ValueError, match="different bucket layouts"):
        a.merge(LatencyHistogram(HistogramConfig(growth=1.05)))


def test_take_hands_over_the_window_and_resets() -> None:
    hist = LatencyHistogram()
    for value in (2e6, 3e6, 4e6):
        hist.record(value)
    window = hist.take()
    assert window.count == 3 and hist.count == 0 and hist.max is None
    summary = window.summary_ms()
    assert summary["count"] == 3 and summary["max_ms"] == 4.0
    assert summary["p50_ms"] == pytest.approx(3.0, rel=window.relative_error)


@pytest.mark.parametrize(
    ("min_ns", "max_ns", "growth", "warmup"),
    [(0, 10, 1.02, 0), (10, 10, 1.02, 0), (1, 10, 1.0, 0), (1, 10, 3.0, 0), (1, 10, 1.02, -1)],
)
def test_bad_config(min_ns: int, max_ns: int, growth: float, warmup: int) -> None:
    with pytest.raises(ValueError, match="histogram"):
        HistogramConfig(min_ns, max_ns, growth, warmup)

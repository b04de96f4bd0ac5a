"""The latency sketch behind rollup and fleet p95s, checked against numpy on real samples."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from server.telemetry import latency_sketch


def test_sketch_reads_back_a_windows_own_p95() -> None:
    stats = {"p50": 3.0, "p90": 4.0, "p95": 5.0, "p99": 7.0, "max": 9.0, "count": 1000}
    sketch = latency_sketch.from_percentiles(stats)
    assert math.isclose(latency_sketch.total(sketch), 1000)
    for q, expected in ((0.5, 3.0), (0.9, 4.0), (0.95, 5.0), (0.99, 7.0)):
        got = latency_sketch.quantile(sketch, q)
        assert got is not None and abs(got / expected - 1) <= 0.1, (q, got)


def test_merged_sketch_p95_matches_numpy_on_a_mixed_fleet() -> None:
    """Nine fast cameras and one slow one: the fleet p95 is not the mean of window p95s."""
    rng = np.random.default_rng(7)
    merged: latency_sketch.Sketch = {}
    samples = []
    window_p95s = []
    for device in range(10):
        median = 30.0 if device == 0 else 3.0
        for _ in range(6):
            data = rng.lognormal(math.log(median), 0.25, size=int(rng.integers(200, 400)))
            samples.append(data)
            stats: dict[str, Any] = {
                f"p{p}": float(np.percentile(data, p)) for p in (50, 90, 95, 99)
            }
            stats.update(max=float(data.max()), count=len(data))
            window_p95s.append(stats["p95"])
            latency_sketch.merge(merged, latency_sketch.from_percentiles(stats))
    truth = float(np.percentile(np.concatenate(samples), 95))
    got = latency_sketch.quantile(merged, 0.95)
    assert got is not None and abs(got / truth - 1) < 0.15, (got, truth)
    naive = float(np.mean(window_p95s))
    assert abs(naive / truth - 1) > 3 * abs(got / truth - 1)  # the naive answer is far off


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        "p95",
        [],
        {},
        {"p50": 3.0},  # no count
        {"count": 10},  # no points
        {"p50": "fast", "p95": None, "count": 10},
        {"p50": float("nan"), "count": 5},
        {"p50": -1.0, "count": 5},
        {"p50": 3.0, "count": True},
        {"p50": 3.0, "count": 10**12},
    ],
)
def test_sketch_ignores_garbage(garbage: Any) -> None:
    assert latency_sketch.from_percentiles(garbage) == {}


def test_sketch_tolerates_inverted_percentiles_and_bad_json() -> None:
    sketch = latency_sketch.from_percentiles({"p50": 9.0, "p90": 2.0, "max": 1.0, "count": 10})
    assert all(w >= 0 for w in sketch.values()) and math.isclose(latency_sketch.total(sketch), 10)
    round_trip = latency_sketch.from_json(json.loads(json.dumps(latency_sketch.to_json(sketch))))
    assert latency_sketch.quantile(round_trip, 0.5) == pytest.approx(
        latency_sketch.quantile(sketch, 0.5), rel=1e-3
    )
    assert latency_sketch.from_json({"x": 1, "-3": 2, "5": "a", "99999": 1, "7": 2.5}) == {7: 2.5}
    assert latency_sketch.from_json(["not", "a", "map"]) == {}
    with pytest.raises(ValueError, match="quantile"):
        latency_sketch.quantile(sketch, 1.5)

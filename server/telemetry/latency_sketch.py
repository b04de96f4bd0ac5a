"""A mergeable latency distribution built from one window's percentiles (pure).

Agents report each telemetry window as ``{p50, p90, p95, p99, max, count}``,
not raw samples. The p95 of a minute, or of a release across the fleet, is
not the mean (nor the max) of the windows' p95s: a slow device's tail counts
only as much as its share of the inferences. So each window becomes weights
on fixed logarithmic buckets shared by every window and device, and sketches
are merged by adding weights; a percentile is then read off the merged
buckets.

A window's ``count`` is spread over the bands between its reported
percentiles, log-uniformly inside each band: 40 % between p50 and p90, 5 %
between p90 and p95, and so on; the lower half is placed at p50 (we know no
minimum), which can only over-state latencies below the merged median. For a
single window the p95 read back is its own p95 within one bucket (10 %).
If agents ever ship their own histogram buckets, merging those would be exact.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Sketch = dict[int, float]  # bucket index -> weight (inferences)

# The reported points of a window, as (payload key, cumulative fraction).
QUANTILE_POINTS: tuple[tuple[str, float], ...] = (
    ("p50", 0.50),
    ("p90", 0.90),
    ("p95", 0.95),
    ("p99", 0.99),
    ("max", 1.00),
)
_MIN_WEIGHT = 1e-6
_DIGITS = 4


@dataclass(frozen=True)
class SketchConfig:
    """Buckets grow by ``growth`` from ``min_ms`` to ``max_ms``; values outside are clamped."""

    min_ms: float = 0.01
    max_ms: float = 600_000.0
    growth: float = 1.1
    max_count: int = 10**9  # a window claiming more inferences is garbage

    def __post_init__(self) -> None:
        if not 0 < self.min_ms < self.max_ms or not 1 < self.growth <= 2:
            raise ValueError(f"invalid sketch configuration {self}")

    @functools.cached_property
    def buckets(self) -> int:
        return math.ceil(math.log(self.max_ms / self.min_ms) / math.log(self.growth))

    @functools.cached_property
    def log_growth(self) -> float:
        return math.log(self.growth)

    @functools.cached_property
    def log_min(self) -> float:
        return math.log(self.min_ms)


DEFAULT = SketchConfig()


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


def bucket_of(value_ms: float, cfg: SketchConfig = DEFAULT) -> int:
    if value_ms <= cfg.min_ms:
        return 0
    index = int((math.log(value_ms) - cfg.log_min) / cfg.log_growth)
    return min(index, cfg.buckets - 1)


def bucket_bounds(index: int, cfg: SketchConfig = DEFAULT) -> tuple[float, float]:
    return cfg.min_ms * cfg.growth**index, cfg.min_ms * cfg.growth ** (index + 1)


def _spread(sketch: Sketch, lo: float, hi: float, mass: float, cfg: SketchConfig) -> None:
    """Add ``mass`` spread log-uniformly over ``[lo, hi]``."""
    lo = min(max(lo, cfg.min_ms), cfg.max_ms)
    hi = min(max(hi, lo), cfg.max_ms)
    first, last = bucket_of(lo, cfg), bucket_of(hi, cfg)
    if first == last or hi <= lo:
        sketch[first] = sketch.get(first, 0.0) + mass
        return
    log_lo, log_hi = math.log(lo), math.log(hi)
    per_log = mass / (log_hi - log_lo)
    log_g = cfg.log_growth
    edge = cfg.log_min + first * log_g  # lower edge of bucket ``first``, in log space
    for index in range(first, last + 1):
        overlap = min(log_hi, edge + log_g) - max(log_lo, edge)
        if overlap > 0:
            sketch[index] = sketch.get(index, 0.0) + per_log * overlap
        edge += log_g


def from_percentiles(stats: Any, cfg: SketchConfig = DEFAULT) -> Sketch:
    """A window's ``{p50, p90, p95, p99, max, count}`` as a sketch; {} when unusable.

    Missing points are skipped (their mass joins the next band); points that
    go down are raised to the previous one, so garbage cannot make negative
    weights.
    """
    if not isinstance(stats, Mapping):
        return {}
    count = _finite(stats.get("count"))
    if count is None or count < 1 or count > cfg.max_count:
        return {}
    points: list[tuple[float, float]] = []
    for key, fraction in QUANTILE_POINTS:
        value = _finite(stats.get(key))
        if value is not None:
            floor = points[-1][1] if points else 0.0
            points.append((fraction, max(value, floor)))
    if not points:
        return {}
    sketch: Sketch = {}
    first_fraction, first_value = points[0]
    _spread(sketch, first_value, first_value, count * first_fraction, cfg)
    for (f_lo, v_lo), (f_hi, v_hi) in itertools.pairwise(points):
        _spread(sketch, v_lo, v_hi, count * (f_hi - f_lo), cfg)
    last_fraction, last_value = points[-1]
    if last_fraction < 1.0:  # no max reported: the tail sits at the last known point
        _spread(sketch, last_value, last_value, count * (1.0 - last_fraction), cfg)
    return sketch


def merge(into: Sketch, other: Mapping[int, float]) -> Sketch:
    for index, weight in other.items():
        into[index] = into.get(index, 0.0) + weight
    return into


def total(sketch: Mapping[int, float]) -> float:
    return sum(sketch.values())


def quantile(sketch: Mapping[int, float], q: float, cfg: SketchConfig = DEFAULT) -> float | None:
    """The ``q`` quantile (0 < q <= 1), interpolated log-linearly inside its bucket."""
    if not 0 < q <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {q}")
    weight_total = total(sketch)
    if weight_total <= 0:
        return None
    target = q * weight_total
    running = 0.0
    for index in sorted(sketch):
        weight = sketch[index]
        if weight <= 0:
            continue
        if running + weight >= target:
            lo, hi = bucket_bounds(index, cfg)
            fraction = min(max((target - running) / weight, 0.0), 1.0)
            return float(lo * (hi / lo) ** fraction)
        running += weight
    return bucket_bounds(max(sketch), cfg)[1]


def to_json(sketch: Mapping[int, float]) -> dict[str, float]:
    """Compact JSON form: string keys, rounded weights, empty buckets dropped."""
    return {
        str(index): round(weight, _DIGITS)
        for index, weight in sorted(sketch.items())
        if weight >= _MIN_WEIGHT
    }


def from_json(value: Any, cfg: SketchConfig = DEFAULT) -> Sketch:
    """Parse a stored sketch, skipping any entry that is not a valid bucket and weight."""
    if not isinstance(value, Mapping):
        return {}
    sketch: Sketch = {}
    for key, weight in value.items():
        number = _finite(weight)
        try:
            index = int(key)
        except (TypeError, ValueError):
            continue
        if number is not None and 0 <= index < cfg.buckets:
            sketch[index] = sketch.get(index, 0.0) + number
    return sketch

"""Fixed-memory latency histogram with logarithmic buckets (HDR-like).

Buckets grow geometrically by ``growth`` from ``min_ns`` (1 µs) to ``max_ns``
(60 s): 905 buckets at the default 2 %, whatever the number of records. A
percentile is the geometric middle of the bucket holding the nearest-rank
order statistic, clamped to the exact min/max seen, so for values in range
its relative error is at most ``sqrt(growth) - 1`` (about 1 % by default).
Values below ``min_ns`` share one under-range bucket and are reported as at
most ``min_ns``; values at or above ``max_ns`` share an over-range bucket
reported at the exact maximum.

Not thread-safe: record and ``take()`` from the inference thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class HistogramConfig:
    min_ns: int = 1_000
    max_ns: int = 60_000_000_000
    growth: float = 1.02
    warmup: int = 0  # first records after creation are ignored (JIT, caches, delegate init)

    def __post_init__(self) -> None:
        if not 0 < self.min_ns < self.max_ns:
            raise ValueError(f"histogram needs 0 < min_ns < max_ns: {self.min_ns}, {self.max_ns}")
        if not 1.0 < self.growth <= 2.0:
            raise ValueError(f"histogram growth must be in (1, 2], got {self.growth}")
        if self.warmup < 0:
            raise ValueError(f"histogram warmup must be >= 0, got {self.warmup}")

    @property
    def buckets(self) -> int:
        """In-range buckets (the two range-overflow buckets come on top)."""
        return math.ceil(math.log(self.max_ns / self.min_ns) / math.log(self.growth))

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.growth) - 1.0


class LatencyHistogram:
    def __init__(self, config: HistogramConfig | None = None, *, warmup: int | None = None) -> None:
        self.config = config or HistogramConfig()
        if warmup is not None:
            self.config = replace(self.config, warmup=warmup)
        self._n = self.config.buckets
        self._min_ns = self.config.min_ns
        self._max_ns = self.config.max_ns
        self._inv_log_g = 1.0 / math.log(self.config.growth)
        # Index 0 is under range, 1.._n in range, _n + 1 over range.
        self._counts = [0] * (self._n + 2)
        self._warmup_left = self.config.warmup
        self._clear()

    def _clear(self) -> None:
        self._counts[:] = [0] * (self._n + 2)
        self.count = 0
        self.total_ns = 0.0
        self.min_seen_ns: float | None = None
        self.max_seen_ns: float | None = None

    @property
    def relative_error(self) -> float:
        return self.config.relative_error

    @property
    def warmup_remaining(self) -> int:
        return self._warmup_left

    @property
    def bucket_count(self) -> int:
        return len(self._counts)

    def record(self, ns: float) -> None:
        """Add one latency in nanoseconds (e.g. a ``perf_counter_ns`` difference)."""
        if self._warmup_left:
            self._warmup_left -= 1
            return
        if not ns >= 0:  # also rejects NaN
            raise ValueError(f"latency must be a non-negative number of ns, got {ns!r}")
        if ns < self._min_ns:
            index = 0
        elif ns >= self._max_ns:
            index = self._n + 1
        else:
            # min() guards the float rounding of log() just below max_ns.
            index = min(self._n, int(math.log(ns / self._min_ns) * self._inv_log_g) + 1)
        self._counts[index] += 1
        self.count += 1
        self.total_ns += ns
        if self.min_seen_ns is None or ns < self.min_seen_ns:
            self.min_seen_ns = ns
        if self.max_seen_ns is None or ns > self.max_seen_ns:
            self.max_seen_ns = ns

    def _representative(self, index: int) -> float:
        assert self.min_seen_ns is not None and self.max_seen_ns is not None
        if index == 0:
            value = float(self._min_ns)
        elif index == self._n + 1:
            value = self.max_seen_ns
        else:
            value = self._min_ns * self.config.growth ** (index - 0.5)
        return min(max(value, self.min_seen_ns), self.max_seen_ns)

    def percentile(self, q: float) -> float | None:
        """Nearest-rank ``q``-th percentile in ns (``q`` in 0..100); None when empty."""
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {q}")
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q * self.count / 100.0))
        seen = 0
        for index, bucket in enumerate(self._counts):
            seen += bucket
            if seen >= rank:
                return self._representative(index)
        raise AssertionError("bucket counts do not add up to count")  # unreachable

    @property
    def p50(self) -> float | None:
        return self.percentile(50.0)

    @property
    def p90(self) -> float | None:
        return self.percentile(90.0)

    @property
    def p99(self) -> float | None:
        return self.percentile(99.0)

    @property
    def max(self) -> float | None:
        return self.max_seen_ns

    @property
    def mean(self) -> float | None:
        return self.total_ns / self.count if self.count else None

    def merge(self, other: LatencyHistogram) -> None:
        """Add ``other``'s records to this one; both must share a bucket layout."""
        mine, theirs = self.config, other.config
        if (mine.min_ns, mine.max_ns, mine.growth) != (theirs.min_ns, theirs.max_ns, theirs.growth):
            raise ValueError("cannot merge histograms with different bucket layouts")
        if other.count == 0:
            return
        for index, bucket in enumerate(other._counts):
            self._counts[index] += bucket
        self.count += other.count
        self.total_ns += other.total_ns
        assert other.min_seen_ns is not None and other.max_seen_ns is not None
        lo, hi = other.min_seen_ns, other.max_seen_ns
        self.min_seen_ns = lo if self.min_seen_ns is None else min(self.min_seen_ns, lo)
        self.max_seen_ns = hi if self.max_seen_ns is None else max(self.max_seen_ns, hi)

    def reset(self) -> None:
        """Forget all records; warm-up is not re-armed (it is about the model's first runs)."""
        self._clear()

    def take(self) -> LatencyHistogram:
        """A copy of the current window; this histogram is reset for the next one."""
        copy = LatencyHistogram(self.config, warmup=0)
        copy.merge(self)
        self.reset()
        return copy

    def summary_ms(self) -> dict[str, float | int | None]:
        """``count``, ``p50_ms``, ``p90_ms``, ``p99_ms``, ``max_ms`` for telemetry."""

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value / 1e6, 4)

        return {
            "count": self.count,
            "p50_ms": ms(self.p50),
            "p90_ms": ms(self.p90),
            "p99_ms": ms(self.p99),
            "max_ms": ms(self.max),
        }

"""Token-bucket rate limits for enrollment (per enrollment token) and check-ins (per device).

``take`` is the pure bucket arithmetic; ``KeyedLimiter`` keeps one bucket per key
behind a lock, bounded as an LRU so a flood of distinct keys cannot grow memory
(an evicted key comes back with a full bucket, which only ever admits more).

The limits are per server process: with N replicas behind a load balancer a
client may get up to N times the configured rate. That is fine for their purpose,
stopping floods and runaway devices, not metering.

Check-ins are keyed by the digest of the presented device token, not by the
device id in the path: anyone may know a device id, so keying on it would let a
stranger exhaust a real device's bucket. Only the token's holder can.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.errors import ConfigError, RateLimitedError

if TYPE_CHECKING:
    from fastapi import FastAPI, Request

    from server.config import ServerConfig


@dataclass(frozen=True)
class BucketSpec:
    """``rate_per_s`` tokens flow in each second up to ``burst``; 0 turns the limit off."""

    rate_per_s: float
    burst: float

    def __post_init__(self) -> None:
        if not (self.rate_per_s >= 0 and math.isfinite(self.rate_per_s)):
            raise ConfigError(f"a rate limit must be a finite rate >= 0, not {self.rate_per_s}")
        if self.rate_per_s > 0 and not 1 <= self.burst < math.inf:
            raise ConfigError(f"a rate limit's burst must be at least 1, not {self.burst}")

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0


def take(spec: BucketSpec, tokens: float, elapsed_s: float) -> tuple[float, float]:
    """Refill a bucket that held ``tokens`` ``elapsed_s`` ago and try to spend one.

    Returns (tokens now, seconds to wait): a wait of 0.0 means admitted, one token
    spent; otherwise nothing is spent and the wait is when the next token arrives.
    """
    tokens = min(spec.burst, tokens + max(elapsed_s, 0.0) * spec.rate_per_s)
    if tokens >= 1.0:
        return tokens - 1.0, 0.0
    return tokens, (1.0 - tokens) / spec.rate_per_s


class KeyedLimiter:
    """One bucket per key (thread-safe), at most ``max_keys`` of them, least recent evicted."""

    def __init__(self, name: str, spec: BucketSpec, max_keys: int) -> None:
        if max_keys < 1:
            raise ConfigError(f"rate limit {name}: max_keys must be at least 1")
        self.name = name
        self.spec = spec
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # key -> [tokens, stamp]
        self._lock = threading.Lock()

    def wait_s(self, key: str, now: float | None = None) -> float:
        """0.0 if ``key`` may proceed now (and a token is spent), else seconds to wait."""
        if not self.spec.enabled:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = [self.spec.burst, now]
                if len(self._buckets) > self.max_keys:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
            bucket[0], wait = take(self.spec, bucket[0], now - bucket[1])
            bucket[1] = now
            return wait

    def check(self, key: str, what: str) -> None:
        """RateLimitedError (429, Retry-After) when ``key`` has no token left."""
        wait = self.wait_s(key)
        if wait > 0.0:
            raise RateLimitedError(
                f"too many {what}: at most {self.spec.rate_per_s:g}/s "
                f"(burst {self.spec.burst:g}); retry in {math.ceil(wait)} s",
                retry_after_s=math.ceil(wait),
            )

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True)
class RateLimits:
    enroll: KeyedLimiter  # per enrollment token
    checkin: KeyedLimiter  # per device token

    @classmethod
    def from_config(cls, cfg: ServerConfig) -> RateLimits:
        keys = cfg.rate_limit_keys
        return cls(
            enroll=KeyedLimiter(
                "enroll", BucketSpec(cfg.enroll_rate_per_s, cfg.enroll_burst), keys
            ),
            checkin=KeyedLimiter(
                "checkin", BucketSpec(cfg.checkin_rate_per_s, cfg.checkin_burst), keys
            ),
        )


def install_rate_limits(app: FastAPI, cfg: ServerConfig) -> None:
    app.state.edgefleet_rate_limits = RateLimits.from_config(cfg)


def rate_limits(request: Request) -> RateLimits:
    limits: RateLimits = request.app.state.edgefleet_rate_limits
    return limits

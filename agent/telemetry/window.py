"""One telemetry window: latency percentiles, throughput, process load, power and thermal.

Latencies go into fixed-memory histograms (never an unbounded list); the first
``warmup`` inferences after each model swap are left out, because the first
invokes of a fresh interpreter allocate and are not representative. ``record``
is on the inference hot path, so it does no allocation and no IO.

The payload of a ``telemetry`` message (keys are stable; values may be null
when a source is missing):

- ``window_s``, ``inferences`` (including warm-up), ``errors``, ``fps``;
- ``invoke_ms`` / ``e2e_ms``: ``{p50, p90, p95, p99, max, count}`` (invoke only;
  frame + pre-processing + invoke + post-processing), warm-up excluded;
- ``cpu_percent`` (this process, 100 = one core), ``rss_mb``;
- ``power``: ``{mw, max_mw, source: sensor|estimate, detail, samples,
  read_errors, idle_mw, energy_mj, mj_per_inference, mj_per_inference_above_idle}``;
- ``thermal``: ``{max_c, zones_c, throttled, flags, since_boot, oc_events,
  cpu_max_freq_ratio, cpu_max_freq_khz, errors}``; ``flags`` are the throttle
  flags seen during the window, ``since_boot`` the Pi's sticky bits;
- ``model``, ``release``, ``variant``, ``slot``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

from agent.telemetry.histogram import LatencyHistogram
from agent.telemetry.sampler import PowerWindow

_NS_PER_MS = 1e6


def _ms(ns: float) -> float:
    return round(ns / _NS_PER_MS, 3)


class TelemetryWindow:
    """Accumulates one window; ``snapshot`` returns its payload and starts the next."""

    def __init__(self, warmup: int = 5) -> None:
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.warmup = warmup
        # Warm-up is handled here, per model swap, so the histograms keep none.
        self.invoke = LatencyHistogram(warmup=0)
        self.e2e = LatencyHistogram(warmup=0)
        self._proc = psutil.Process(os.getpid())
        self._proc.cpu_percent(None)
        self._manifest: dict[str, Any] | None = None
        self._skip = warmup
        self._errors = 0
        self._count = 0
        self._started = time.monotonic()

    def restart(self, manifest: dict[str, Any] | None) -> None:
        """A new model: drop the partial window and skip its warm-up frames."""
        self._manifest = manifest
        self._skip = self.warmup
        self._reset()
        self._proc.cpu_percent(None)  # CPU % of the new window only

    def _reset(self) -> None:
        self.invoke.reset()
        self.e2e.reset()
        self._errors = 0
        self._count = 0
        self._started = time.monotonic()

    def record(self, invoke_ns: int, e2e_ns: int) -> None:
        self._count += 1
        if self._skip:
            self._skip -= 1
            return
        self.invoke.record(invoke_ns)
        self.e2e.record(e2e_ns)

    def error(self) -> None:
        self._errors += 1

    @property
    def count(self) -> int:
        return self._count

    @property
    def warmup_remaining(self) -> int:
        return self._skip

    def snapshot(
        self,
        slot: str | None,
        power: PowerWindow | None = None,
        idle_mw: float = 0.0,
    ) -> dict[str, Any] | None:
        """The window's payload (None when no model ran and nothing was counted)."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        if self._manifest is None and self._count == 0:
            self._reset()
            return None
        manifest = self._manifest or {}
        payload: dict[str, Any] = {
            "window_s": round(elapsed, 3),
            "inferences": self._count,
            "errors": self._errors,
            "fps": round(self._count / elapsed, 2),
            "invoke_ms": _percentiles(self.invoke),
            "e2e_ms": _percentiles(self.e2e),
            "cpu_percent": self._proc.cpu_percent(None),
            "rss_mb": round(self._proc.memory_info().rss / 2**20, 1),
            "power": power_fields(power, self._count, idle_mw),
            "thermal": thermal_fields(power),
            "model": manifest.get("name"),
            "release": manifest.get("release"),
            "variant": manifest.get("variant"),
            "slot": slot,
        }
        self._reset()
        return payload


def _percentiles(hist: LatencyHistogram) -> dict[str, float] | None:
    p50, p90, p95 = hist.p50, hist.p90, hist.percentile(95.0)
    p99, top = hist.p99, hist.max
    if p50 is None or p90 is None or p95 is None or p99 is None or top is None:
        return None
    return {"p50": _ms(p50), "p90": _ms(p90), "p95": _ms(p95), "p99": _ms(p99),
            "max": _ms(top), "count": hist.count}


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def power_fields(
    power: PowerWindow | None, inferences: int, idle_mw: float
) -> dict[str, Any] | None:
    """Mean power with its provenance, and energy per inference (pure)."""
    if power is None:
        return None
    energy = power.per_inference(inferences, idle_mw)
    return {
        "mw": _round(power.mean_mw, 1),
        "max_mw": _round(power.max_mw, 1),
        "source": power.source,
        "detail": power.detail,
        "samples": power.samples,
        "read_errors": power.read_errors,
        "idle_mw": round(idle_mw, 1),
        "energy_mj": _round(power.energy_mj, 1),
        "mj_per_inference": _round(energy.total_mj, 4),
        "mj_per_inference_above_idle": _round(energy.above_idle_mj, 4),
    }


def thermal_fields(power: PowerWindow | None) -> dict[str, Any] | None:
    """Temperatures, throttle evidence during the window and the CPU frequency cap (pure)."""
    if power is None or power.thermal is None:
        return None
    sample = power.thermal
    cpufreq = sample.cpufreq
    return {
        "max_c": power.max_temp_c,
        "zones_c": dict(sample.zones_c),
        "throttled": power.throttled,
        "flags": list(power.throttle_flags),
        "since_boot": sorted(sample.throttle.since_boot) if sample.throttle else None,
        "oc_events": dict(sample.oc_events) if sample.oc_events is not None else None,
        "cpu_max_freq_ratio": round(cpufreq.ratio, 4) if cpufreq else None,
        "cpu_max_freq_khz": min(s for s, _ in cpufreq.policies.values()) if cpufreq else None,
        "errors": list(sample.errors),
    }


_CAMERA_COUNTERS = ("frames_captured", "frames_dropped", "decode_errors", "reconnects")


def camera_fields(
    now: dict[str, Any], before: Any | None, processed_fps: float | None
) -> dict[str, Any]:
    """A frame source's window: its state and fps now, and its counters since ``before``.

    ``now`` is ``SourceStats.as_dict()``; ``before`` the previous window's
    ``SourceStats`` (None for the first window, which counts from the start).
    """
    previous = before.as_dict() if before is not None else {}
    out: dict[str, Any] = {
        "state": now["state"],
        "camera_fps": round(float(now["camera_fps"]), 2),
        "processed_fps": processed_fps,
    }
    for key in _CAMERA_COUNTERS:
        out[key] = int(now[key]) - int(previous.get(key, 0))
    out["downtime_s"] = round(float(now["downtime_s"]) - float(previous.get("downtime_s", 0.0)), 3)
    return out

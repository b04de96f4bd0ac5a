"""What a simulated device says: telemetry windows and update-event details (pure).

The keys are the real agent's (``agent.telemetry.window`` for windows, with the power
section built by the agent's own ``power_fields``; ``agent.update.updater`` for the
download report), so the server cannot tell a simulated window from a real
one except by the ``simulated`` flag. Per-window noise is a hash of the seed,
the device and the window number, so a run is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from agent import __version__ as AGENT_VERSION  # noqa: N812 - reads as a constant here
from agent.protocol.api import ShadowTarget
from agent.protocol.manifest import ModelManifest
from agent.telemetry.sampler import PowerWindow
from agent.telemetry.window import power_fields
from server.simulator.behaviour import ReleaseEffect, Traits, draw, normal

# Invoke latency within a window is log-normal with this sigma; p95 = median * e^(1.645 sigma).
LATENCY_SIGMA = 0.15
_Z = {"p50": 0.0, "p90": 1.2816, "p95": 1.6449, "p99": 2.3263, "max": 3.0902}
E2E_OVERHEAD = 1.35  # frame grab + pre/post-processing on top of invoke
IDLE_SHARE = 0.45  # a board's idle draw as a share of its draw while inferring


@dataclass(frozen=True)
class WindowSpec:
    """Knobs of the synthetic window."""

    window_s: float = 1.0
    fps: float = 15.0
    noise: float = 0.02  # window-to-window spread of latency and power
    rss_mb: float = 180.0


def latency_summary(p95_ms: float, count: int, sigma: float = LATENCY_SIGMA) -> dict[str, Any]:
    """``{p50, p90, p95, p99, max, count}`` of a log-normal whose p95 is ``p95_ms``."""
    median = p95_ms / math.exp(sigma * _Z["p95"])
    out: dict[str, Any] = {k: round(median * math.exp(sigma * z), 3) for k, z in _Z.items()}
    out["count"] = count
    return out


def telemetry_window(
    *,
    seed: int,
    hardware_id: str,
    index: int,
    traits: Traits,
    manifest: ModelManifest,
    slot: str,
    profile: str,
    spec: WindowSpec,
) -> dict[str, Any]:
    """Window number ``index`` of one device running ``manifest`` (the agent's keys)."""
    jitter = math.exp(spec.noise * normal(seed, hardware_id, "window", index))
    drift = math.exp(spec.noise * normal(seed, hardware_id, "watts", index))
    inferences = max(1, round(spec.fps * spec.window_s))
    p95 = traits.p95_ms * jitter
    mean_mw = traits.power_mw * drift
    power = PowerWindow(
        duration_s=spec.window_s,
        samples=max(1, round(spec.window_s)),
        mean_mw=mean_mw,
        max_mw=mean_mw * 1.08,
        source=traits.power_source,
        detail="simulated",
        energy_mj=mean_mw * spec.window_s,
        read_errors=0,
        thermal=None,
        max_temp_c=None,
        throttled=None,
        throttle_flags=(),
    )
    busy = min(100.0, spec.fps * p95 / 10.0)  # ms of work per second, as % of one core
    return {
        "window_s": spec.window_s,
        "inferences": inferences,
        "errors": 0,
        "fps": round(inferences / spec.window_s, 2),
        "invoke_ms": latency_summary(p95, inferences),
        "e2e_ms": latency_summary(p95 * E2E_OVERHEAD, inferences),
        "cpu_percent": round(busy, 1),
        "rss_mb": spec.rss_mb,
        "power": power_fields(power, inferences, traits.power_mw * IDLE_SHARE),
        "thermal": None,
        "model": manifest.name,
        "release": manifest.release,
        "variant": manifest.variant,
        "slot": slot,
        "profile": profile,
        "runtime": "simulated",
        "threads": 1,
        "agent_version": AGENT_VERSION,
        "simulated": True,
    }


def download_report(
    *,
    manifest: ModelManifest,
    update_id: str,
    via: str,
    bytes_downloaded: int,
    delta_bytes: int,
    fallback: str | None,
) -> dict[str, Any]:
    """The bandwidth report ``agent.update.updater`` sends as a ``download`` event."""
    return {
        "target_bytes": manifest.length,
        "delta_bytes": delta_bytes,
        "fallback": fallback,
        "via": via,
        "bytes_downloaded": bytes_downloaded,
        "update_id": update_id,
        "name": manifest.name,
        "release": manifest.release,
        "variant": manifest.variant,
        "fp32_bytes": manifest.fp32_length,
        "simulated": True,
    }


def aux_report(
    manifest: ModelManifest, update_id: str, golden_bytes: int, metadata_bytes: int
) -> dict[str, Any]:
    """What an update cost besides the model, as the agent's ``download``/``aux`` report."""
    return {
        "update_id": update_id,
        "via": "aux",
        "name": manifest.name,
        "release": manifest.release,
        "variant": manifest.variant,
        "bytes_downloaded": golden_bytes + metadata_bytes,
        "target_bytes": 0,
        "golden_set_bytes": golden_bytes,
        "metadata_bytes": metadata_bytes,
        "simulated": True,
    }


def golden_report(
    manifest: ModelManifest, accuracy: float, min_accuracy: float, count: int
) -> dict[str, Any]:
    """The ``golden_set``/``scored`` detail: overall and per class (all classes alike)."""
    per_class = {label: round(accuracy, 4) for label in manifest.labels}
    return {
        "accuracy": round(accuracy, 4),
        "count": count,
        "per_class": per_class,
        "release": manifest.release,
        "min_accuracy": min_accuracy,
    }


def shadow_results(
    *,
    seed: int,
    hardware_id: str,
    index: int,
    manifest: ModelManifest,
    target: ShadowTarget,
    effect: ReleaseEffect,
    candidate: Traits,
    serving: Traits,
    spec: WindowSpec,
) -> dict[str, Any]:
    """A ``results`` window with the ``shadow`` block of the agent's shadow runner.

    Each shadowed frame's class is drawn uniformly from the serving model's labels;
    the candidate agrees with the release effect's ``agreement_of`` that class and
    otherwise answers the next class, so a weak class shows as one confusion.
    """
    labels = manifest.labels or ("0",)
    frames = round(spec.fps * spec.window_s)
    every = target.every_n
    # Spread the remainder over windows, so the long-run share is exactly 1 in every_n.
    shadowed = (index + 1) * frames // every - index * frames // every
    pairs: dict[tuple[int, int], int] = {}
    for k in range(shadowed):
        cls = int(draw(seed, hardware_id, "shadow-class", index, k) * len(labels))
        agrees = draw(seed, hardware_id, "shadow-agree", index, k) < effect.agreement_of(cls)
        key = (cls, cls if agrees else (cls + 1) % len(labels))
        pairs[key] = pairs.get(key, 0) + 1
    counts: dict[str, int] = {}
    for (i, _), n in pairs.items():
        counts[labels[i]] = counts.get(labels[i], 0) + n
    hist = [0] * 10
    hist[-1] = shadowed
    p95 = candidate.p95_ms
    block = {
        "rollout_id": target.rollout_id,
        "name": target.name,
        "release": target.release,
        "frames": frames,
        "shadowed": shadowed,
        "skipped": 0,
        "agreed": sum(n for (i, j), n in pairs.items() if i == j),
        "pairs": [[i, j, n] for (i, j), n in sorted(pairs.items())],
        "labels": list(labels),
        "candidate_latency_ms": {k: v for k, v in latency_summary(p95, shadowed).items()
                                 if k in ("p50", "p95", "max")},
        "serving_latency_ms": {k: v for k, v in latency_summary(serving.p95_ms, shadowed).items()
                               if k in ("p50", "p95")},
        "candidate_mj": round(candidate.power_mw * (1 - IDLE_SHARE) * p95 / 1000.0, 4),
        "error": None,
    }  # fmt: skip
    return {
        "model": manifest.name,
        "release": manifest.release,
        "slot": "a",
        "class_counts": counts,
        "confidence_hist": hist,
        "last_top_k": [],
        "shadow": block,
        "simulated": True,
    }

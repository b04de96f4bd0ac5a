"""The operator's flat options (CLI flags or REST fields) turned into a rollout spec.

Pure: no IO. Every stage shares the options; a spec with per-stage settings is
given in its stored form instead (``RolloutSpec.from_json``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from server.errors import InvalidInputError
from server.rollout.core.spec import (
    DEFAULT_LIMITS,
    RolloutSpec,
    SpecLimits,
    parse_stage_sizes,
)


def build_spec(
    *,
    release: str,
    select: Sequence[str] = (),
    profiles: Sequence[str] = (),
    devices: Sequence[str] = (),
    all_devices: bool = False,
    stages: str = "1%,10%,50%,100%",
    soak: str = "30m",
    timeout: str = "1h",
    success: str | None = None,
    max_failure: str = "2%",
    max_install_failure: str | None = "5%",
    max_latency_regression: str | None = "10%",
    max_power_regression: str | None = "10%",
    min_golden_accuracy: str | None = None,
    max_device_errors: int | None = None,
    min_sample: int = 10,
    latency_floor_ms: str = "0.5",
    power_floor_mw: str = "100",
    gate_estimated_power: bool = False,
    max_concurrent_downloads: int = 100,
    window_cron: str | None = None,
    window_duration: str | None = None,
    window_timezone: str = "UTC",
    approval: bool = False,
    variants: Mapping[str, str] | None = None,
    shadow_every: int | None = None,
    min_shadow_agreement: str = "95%",
    shadow_min_frames: int = 30,
    shadow_cpu_budget: str = "25%",
    shadow_duration: str = "30m",
    limits: SpecLimits = DEFAULT_LIMITS,
) -> RolloutSpec:
    """The operator's options (CLI flags or REST fields), with every stage sharing them."""
    stage = {
        "soak": soak,
        "timeout": timeout,
        "success": success,
        "max_failures": max_failure,
        "approval": approval,
        "gates": {
            "max_install_failure": max_install_failure,
            "max_latency_regression": max_latency_regression,
            "max_power_regression": max_power_regression,
            "min_golden_accuracy": min_golden_accuracy,
            "max_device_errors": max_device_errors,
            "min_sample": min_sample,
            "latency_floor_ms": latency_floor_ms,
            "power_floor_mw": power_floor_mw,
            "gate_estimated_power": gate_estimated_power,
        },
    }
    sizes = parse_stage_sizes(stages, limits)
    if (window_cron is None) != (window_duration is None):
        raise InvalidInputError("a maintenance window needs both a cron line and a duration")
    return RolloutSpec.from_json(
        {
            "release": release,
            "selector": {
                "tags": list(select),
                "profiles": list(profiles),
                "devices": list(devices),
                "all": all_devices,
            },
            "stages": [{**stage, "size": str(size)} for size in sizes],
            "max_concurrent_downloads": max_concurrent_downloads,
            "window": None
            if window_cron is None
            else {"cron": window_cron, "duration": window_duration, "timezone": window_timezone},
            "variants": dict(variants or {}),
            "shadow": None
            if shadow_every is None
            else {
                "every_n": shadow_every,
                "min_agreement": min_shadow_agreement,
                "min_class_frames": shadow_min_frames,
                "cpu_budget": shadow_cpu_budget,
                "duration": shadow_duration,
            },
        },
        limits,
    )

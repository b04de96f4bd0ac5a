"""Builders of rollout facts for the tests of the pure rollout policy."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from server.rollout.core.decision import DecisionKind
from server.rollout.core.options import build_spec
from server.rollout.core.policy import RolloutFacts
from server.rollout.core.spec import RolloutSpec
from server.rollout.core.states import DeviceFacts, InstallStatus, RolloutState, RolloutStatus

UTC = timezone.utc
NOW = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
OK, PEND, DL, FAIL, RB = (InstallStatus.INSTALLED, InstallStatus.PENDING,
                         InstallStatus.DOWNLOADING, InstallStatus.FAILED,
                         InstallStatus.ROLLED_BACK)
K = DecisionKind
# Gates off unless a test switches one on, so each trips alone.
QUIET = {"max_install_failure": None, "max_latency_regression": None,
         "max_power_regression": None}


def make_spec(**kwargs: Any) -> RolloutSpec:
    options: dict[str, Any] = {"release": "digits@2", "all_devices": True,
                               "stages": "10%,100%", **QUIET}
    options.update(kwargs)
    return build_spec(**options)


def dev(i: int | str, status: InstallStatus = OK, *, stage: int = 0, profile: str = "rpi4",
        started: datetime | None = NOW - 2 * HOUR,
        seen: datetime | None = NOW - timedelta(minutes=1), **measured: Any) -> DeviceFacts:
    values: dict[str, Any] = {"baseline_p95_ms": 10.0, "p95_ms": 10.0, "golden_accuracy": 0.95,
                              "baseline_power_mw": 2000.0, "power_mw": 2000.0, **measured}
    name, rank = (i, 0) if isinstance(i, str) else (f"{profile}-{i:03d}", i)
    return DeviceFacts(name, profile, {}, stage, rank, status, started, seen, **values)


def facts(spec: RolloutSpec, devices: list[DeviceFacts], *, state: RolloutState =
          RolloutState.RUNNING, stage: int = 0, stage_started: datetime | None = NOW - 2 * HOUR,
          **status: Any) -> RolloutFacts:
    return RolloutFacts("rollout-1", spec, RolloutStatus(state, stage, stage_started, **status),
                        devices)


def stage0(*groups: tuple[int, InstallStatus]) -> list[DeviceFacts]:
    """Devices in stage 0, e.g. (97, OK), (3, FAIL); stage 1 holds one waiting device."""
    out, n = [], 0
    for count, status in groups:
        for _ in range(count):
            out.append(dev(n, status))
            n += 1
    return [*out, later()]


def later() -> DeviceFacts:
    """A device of the next stage, so that passing stage 0 is an advance."""
    return dev("later-0", PEND, stage=1, started=None)



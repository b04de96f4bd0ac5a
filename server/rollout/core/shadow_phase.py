"""A stage's shadow phase, as the policy sees it: who shadows, and what the gates say.

Pure: no IO. With ``spec.shadow`` set, every stage starts in a shadow phase:
its devices are told to run the candidate beside their current model, and
none is told to install. The phase ends when it has lasted ``duration`` and
every profile's shadow gates have their sample and pass (the policy then
records ``shadow_done`` and starts installing), or when a gate trips (the
rollout pauses; a resume accepts the candidate for that stage). Devices that
never report (agents too old to shadow) hold a profile only until the stage's
timeout, the same one after which a silent device counts as failed. Devices of
earlier stages still waiting to start are not held back by it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from server.rollout.core.gates import GateResult
from server.rollout.core.shadow import SHADOW_AGREEMENT, ShadowReport
from server.rollout.core.shadow_judge import devices_by_profile, judge_shadow
from server.rollout.core.spec import RolloutSpec
from server.rollout.core.states import RolloutStatus
from server.rollout.core.units import format_duration


@dataclass(frozen=True)
class ShadowPhase:
    devices: tuple[str, ...]  # to shadow now, in cohort order
    results: tuple[GateResult, ...]
    left: timedelta = timedelta(0)  # of the phase's minimum duration

    @property
    def pending(self) -> list[str]:
        waiting = [r.message() for r in self.results if r.waiting]
        if self.left > timedelta(0):
            seconds = timedelta(seconds=-(-self.left // timedelta(seconds=1)))
            waiting.append(f"shadow phase: {format_duration(seconds)} left")
        return waiting

    def summary(self) -> str:
        return "; ".join(r.message() for r in self.results if r.name == SHADOW_AGREEMENT)


# (stage, silent, rank, device id, profile): the policy's not-started devices.
Candidate = tuple[int, bool, int, str, str]


def shadow_phase(
    spec: RolloutSpec,
    status: RolloutStatus,
    candidates: Sequence[Candidate],
    reports: Mapping[str, ShadowReport],
    now: datetime,
) -> ShadowPhase | None:
    """The current stage's shadow phase, or None when it has none (or it is over)."""
    cur = status.stage_index
    limits = spec.shadow
    if limits is None or status.shadow_done >= cur:
        return None
    stage = sorted(c for c in candidates if c[0] == cur)
    if not stage:
        return None  # an empty stage (or every device acknowledged) has nothing to shadow
    grouped = devices_by_profile([(c[3], c[4]) for c in stage], reports)
    reachable: dict[str, int] = {}
    for c in stage:
        if not c[1]:
            reachable[c[4]] = reachable.get(c[4], 0) + 1
    min_sample = spec.stages[cur].gates.min_sample
    began = status.stage_started_at or now
    left = max(timedelta(0), began + limits.duration - now)
    results: list[GateResult] = []
    for profile in sorted(grouped):
        results.extend(
            judge_shadow(
                profile, grouped[profile], reachable.get(profile, 0), limits, min_sample,
                over=now >= began + spec.stages[cur].timeout,
            )
        )  # fmt: skip
    return ShadowPhase(tuple(c[3] for c in stage), tuple(results), left)

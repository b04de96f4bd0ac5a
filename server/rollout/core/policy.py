"""The rollout policy: one pure function from stored facts to the next decision.

``decide(facts, now)`` reads the spec, the stored ``RolloutStatus`` and one
``DeviceFacts`` per selected device, makes a single O(N) pass, and returns a
``Decision``: the devices to start now, and the status to store (advance,
await approval, pause with the tripped gates, complete, or unchanged).

Rules, in order:
- a device silent for longer than its stage's timeout (nothing heard since it
  was started) counts as failed, as do failed and rolled-back installs and, when
  ``max_device_errors`` is set, devices reporting more runtime errors;
- acknowledged devices (named by a pause the operator resumed) are left out;
- the current stage's gates are judged per profile over every started device;
  each stage so far keeps its own error threshold (failures allowed) over its
  own devices, so a late failure in an earlier stage still pauses; an explicit
  success threshold that can no longer be reached also pauses;
- the stage passes when all its devices were started, enough succeeded, every
  gate has its sample, and ``soak`` has passed since the stage's last device
  was started; then it completes, waits for approval, or advances to the next
  stage with devices;
- devices start only while running, inside the maintenance window, up to
  ``max_concurrent_downloads`` in flight, earlier stages first, devices seen
  recently before silent ones, then in cohort order.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from server.errors import ServerError
from server.rollout.core.decision import Decision, DecisionKind, StageProgress
from server.rollout.core.gates import (
    ERROR_THRESHOLD,
    SUCCESS_THRESHOLD,
    Factors,
    GateResult,
    ProfileStats,
    judge_profile,
)
from server.rollout.core.shadow import SHADOW_GATES, ShadowReport
from server.rollout.core.shadow_phase import Candidate, shadow_phase
from server.rollout.core.spec import RolloutSpec, StageSpec
from server.rollout.core.states import (
    FINAL,
    DeviceFacts,
    EngineEvent,
    InstallStatus,
    RolloutState,
    RolloutStatus,
    apply_event,
)
from server.rollout.core.units import format_duration


class FactsError(ServerError):
    """The stored facts contradict each other (a bug or a damaged database)."""


@dataclass(frozen=True)
class PolicyConfig:
    listed_devices: int = 10  # device ids named in a pause message


@dataclass(frozen=True)
class RolloutFacts:
    rollout_id: str
    spec: RolloutSpec
    status: RolloutStatus
    devices: Sequence[DeviceFacts]
    shadow: Mapping[str, ShadowReport] = field(default_factory=dict)  # device -> its report


_FAILED = (InstallStatus.FAILED, InstallStatus.ROLLED_BACK)
_ACTIVE = (RolloutState.RUNNING, RolloutState.AWAITING_APPROVAL)


class _Tally:
    """Per-stage counters and per-profile sums from one pass over the devices."""

    def __init__(self, n_stages: int) -> None:
        (
            self.total,
            self.not_started,
            self.in_flight,
            self.succeeded,
            self.failed,
            self.silent,
            self.acked,
            self.acked_ok,
        ) = ([0] * n_stages for _ in range(8))
        self.profiles: dict[str, ProfileStats] = {}
        self.failed_ids: list[list[str]] = [[] for _ in range(n_stages)]
        self.candidates: list[Candidate] = []  # (stage, silent, rank, id, profile)
        self.last_start: datetime | None = None  # latest start in the current stage
        self.in_flight_all = 0

    # The hot loop (65,000 devices a tick): branches inline, lists and sums in locals.
    def count(self, facts: RolloutFacts, now: datetime) -> None:
        stages, cur = facts.spec.stages, facts.status.stage_index
        n_stages = len(stages)
        factors = Factors.of(stages[cur].gates)
        lat, pwr, acc = factors.latency, factors.power, factors.accuracy
        max_errors = stages[cur].gates.max_device_errors
        cutoffs = [now - s.timeout for s in stages]
        ack = facts.status.acknowledged
        total, not_started, in_flight = self.total, self.not_started, self.in_flight
        failed, succeeded = self.failed, self.succeeded
        profiles, candidates = self.profiles, self.candidates
        installed, pending, downloading = (
            InstallStatus.INSTALLED,
            InstallStatus.PENDING,
            InstallStatus.DOWNLOADING,
        )
        for d in facts.devices:
            # One full unpacking costs less than six NamedTuple attribute lookups.
            device_id, profile, _, s, rank, state, started, seen, _, _, _, _, _, _ = d
            if not 0 <= s < n_stages:
                raise FactsError(f"device {device_id} is in stage {s}, which does not exist")
            total[s] += 1
            if ack and device_id in ack:
                self.acked[s] += 1
                self.acked_ok[s] += state is installed  # acknowledged, yet it installed
                continue
            cutoff = cutoffs[s]
            if started is None:
                not_started[s] += 1
                if s <= cur:
                    candidates.append((s, seen is None or seen < cutoff, rank, device_id, profile))
                continue
            if s == cur and (self.last_start is None or started > self.last_start):
                self.last_start = started
            # Silent: nothing heard (start or check-in) for longer than the timeout.
            quiet = started < cutoff and (seen is None or seen < cutoff)
            g = profiles.get(profile)
            if g is None:
                g = profiles[profile] = ProfileStats(factors.latency_floor, factors.power_floor)
            g.started += 1
            if state is installed:
                g.finished += 1
                if not quiet and (max_errors is None or d.error_count <= max_errors):
                    succeeded[s] += 1
                    g.add(d, lat, pwr, acc)
                    continue
            elif (state is pending or state is downloading) and not quiet:
                in_flight[s] += 1
                self.in_flight_all += 1
                continue
            else:  # failed, rolled back, or silent before installing
                g.finished += 1
                g.install_failed.append(device_id)
            failed[s] += 1
            if quiet and state not in _FAILED:
                self.silent[s] += 1
            self.failed_ids[s].append(device_id)

    def progress(self) -> tuple[StageProgress, ...]:
        return tuple(
            StageProgress(
                i,
                self.total[i],
                self.not_started[i],
                self.in_flight[i],
                self.succeeded[i],
                self.failed[i],
                self.silent[i],
                self.acked[i],
            )
            for i in range(len(self.total))
        )


def _check(facts: RolloutFacts, now: datetime) -> None:
    status = facts.status
    if now.tzinfo is None:
        raise FactsError("decide() needs an aware 'now' (UTC)")
    if not 0 <= status.stage_index < len(facts.spec.stages):
        raise FactsError(f"rollout {facts.rollout_id}: stage {status.stage_index} does not exist")
    if status.state in _ACTIVE and status.stage_started_at is None:
        raise FactsError(f"rollout {facts.rollout_id} is {status.state.value} without a start")


def _judge(stages: Sequence[StageSpec], tally: _Tally, cur: int) -> list[GateResult]:
    stage = stages[cur]
    results: list[GateResult] = []
    for profile in sorted(tally.profiles):
        results.extend(judge_profile(profile, tally.profiles[profile], stage.gates))
    size = tally.total[cur] - tally.acked[cur]
    # Every stage so far keeps its own failure budget: a late failure there still counts.
    for j in range(cur + 1):
        results.append(
            _error_gate(
                stages[j], j, tally.total[j] - tally.acked[j], tally.failed_ids[j], tally.silent[j]
            )
        )
    required = _required(stage, size)
    reachable = tally.succeeded[cur] + tally.in_flight[cur] + tally.not_started[cur]
    # Without an explicit success threshold this is the error threshold said twice.
    if stage.success is not None and size and reachable < required:
        results.append(
            GateResult(
                name=SUCCESS_THRESHOLD,
                profile=None,
                value=float(reachable),
                limit=float(required),
                unit="devices",
                bound="min",
                tripped=True,
                sample=size,
                needed=size,
                devices=tuple(sorted(tally.failed_ids[cur])),
                detail=f"{reachable} of {size} stage devices can still succeed",
            )
        )
    return results


def decide(facts: RolloutFacts, now: datetime, config: PolicyConfig = PolicyConfig()) -> Decision:
    """The next step for one rollout; deterministic for the same facts and ``now``."""
    _check(facts, now)
    spec, status = facts.spec, facts.status
    cur = status.stage_index
    stage = spec.stages[cur]
    tally = _Tally(len(spec.stages))
    try:
        tally.count(facts, now)
    except TypeError as err:  # a naive datetime among aware ones
        raise FactsError(f"rollout {facts.rollout_id}: times must be timezone-aware") from err
    phase = shadow_phase(spec, status, tally.candidates, facts.shadow, now)
    results = tuple(_judge(spec.stages, tally, cur)) + (phase.results if phase else ())
    tripped = tuple(r for r in results if r.tripped)
    window_open = spec.window is None or spec.window.is_open(now)

    def make(
        kind: DecisionKind,
        new: RolloutStatus,
        reason: str,
        start: tuple[str, ...] = (),
        waiting: tuple[str, ...] = (),
        *,
        shadow: tuple[str, ...] = (),
    ) -> Decision:
        return Decision(
            kind, new, start, reason, tripped, results, tally.progress(), waiting, window_open,
            shadow,
        )  # fmt: skip

    where = f"stage {cur + 1}/{len(spec.stages)} ({stage.size})"
    if status.state in FINAL or status.state in (RolloutState.DRAFT, RolloutState.PAUSED):
        return make(DecisionKind.NONE, status, status.reason or status.state.value)
    if tripped:
        reason = f"{where} paused: " + "; ".join(r.message(config.listed_devices) for r in tripped)
        held = sorted({device for r in tripped for device in r.devices})
        by_shadow = any(r.name in SHADOW_GATES for r in tripped)
        new = apply_event(
            status, EngineEvent.GATE_TRIPPED, now, reason, held_devices=held, shadow=by_shadow,
            gates=[r.to_json() for r in tripped],
        )  # fmt: skip
        return make(DecisionKind.PAUSE, new, reason)
    if status.state is RolloutState.AWAITING_APPROVAL:
        return make(DecisionKind.NONE, status, status.reason)
    if phase is not None:
        if not phase.pending:
            reason = f"{where}: shadow passed ({phase.summary()}); installing"
            return make(
                DecisionKind.SHADOW_PASSED, replace(status, shadow_done=cur, reason=reason), reason
            )
        # The stage's own devices wait for the verdict; earlier stages' stragglers do not.
        tally.candidates = [c for c in tally.candidates if c[0] < cur]
        waiting = phase.pending
    else:
        waiting = _waiting(stage, status, tally, results, now)
    if not waiting:
        kind, new = _pass_stage(stage, status, tally, now, where)
        return make(kind, new, new.reason)
    start: tuple[str, ...] = ()
    if tally.candidates:
        slots = spec.max_concurrent_downloads - tally.in_flight_all
        if not window_open:
            opens = spec.window.next_open(now) if spec.window else None
            waiting.append(
                "maintenance window closed" + (f"; opens at {opens.isoformat()}" if opens else "")
            )
        elif slots <= 0:
            waiting.append(f"download limit reached ({tally.in_flight_all} in flight)")
        else:
            start = tuple(c[3] for c in heapq.nsmallest(slots, tally.candidates))
    shadowing = phase.devices if phase is not None else ()
    reason = f"{where}: " + "; ".join(waiting)
    return make(DecisionKind.WAIT, status, reason, start, tuple(waiting), shadow=shadowing)


def _waiting(
    stage: StageSpec,
    status: RolloutStatus,
    tally: _Tally,
    results: Sequence[GateResult],
    now: datetime,
) -> list[str]:
    """Why the current stage has not passed yet; empty when it has."""
    cur = status.stage_index
    size = tally.total[cur] - tally.acked[cur]
    if not size:
        return []  # nothing to watch in an empty stage
    waiting: list[str] = []
    if tally.candidates:
        waiting.append(f"{len(tally.candidates)} devices not started yet")
    required = _required(stage, size)
    if tally.succeeded[cur] < required:
        waiting.append(
            f"{tally.succeeded[cur]} of {required} required devices succeeded"
            f" ({tally.in_flight[cur]} installing)"
        )
    started = status.stage_started_at or now
    soak_from = max(started, tally.last_start or started)
    if now < soak_from + stage.soak:
        left = soak_from + stage.soak - now
        waiting.append(f"soak: {format_duration(_ceil_seconds(left))} left")
    waiting.extend(r.message() for r in results if r.waiting)
    return waiting


def _pass_stage(
    stage: StageSpec, status: RolloutStatus, tally: _Tally, now: datetime, where: str
) -> tuple[DecisionKind, RolloutStatus]:
    cur = status.stage_index
    size = tally.total[cur] - tally.acked[cur]
    later = next(
        (j for j in range(cur + 1, len(tally.total)) if tally.total[j] - tally.acked[j] > 0), None
    )
    ok, total, acked = (
        tally.succeeded[cur] + tally.acked_ok[cur],
        tally.total[cur],
        tally.acked[cur],
    )
    noted = f"; {acked} acknowledged by the operator" if acked else ""
    done = f"{where} passed ({ok} of {total} devices succeeded{noted})"
    if later is None:
        new = apply_event(status, EngineEvent.FINISHED, now, f"{done}; rollout complete")
        return DecisionKind.COMPLETE, new
    if stage.approval and size:
        reason = f"{done}; waiting for operator approval of stage {cur + 2}"
        return DecisionKind.AWAIT_APPROVAL, apply_event(
            status, EngineEvent.APPROVAL_NEEDED, now, reason
        )
    new = apply_event(
        status,
        EngineEvent.STAGE_PASSED,
        now,
        f"{done}; advancing to stage {later + 1}",
        next_stage=later,
    )
    return DecisionKind.ADVANCE, new


def _required(stage: StageSpec, size: int) -> int:
    """Devices that must succeed: the success threshold, else all but the failure budget."""
    if stage.success is not None:
        return stage.success.at_least(size)
    return size - stage.max_failures.at_most(size)


def _error_gate(
    stage: StageSpec, index: int, size: int, failed: list[str], quiet: int
) -> GateResult:
    limit = stage.max_failures
    count = len(failed)
    detail = f"{count} of {size} devices failed"
    if quiet:
        detail += f", {quiet} of them silent"
    tripped = limit.exceeded_by(count, size)
    named = tuple(sorted(failed)) if tripped else ()
    if limit.percent:
        value, unit = (count * 100.0 / size if size else 0.0), "%"
    else:
        value, unit = float(count), "devices"
    return GateResult(
        name=ERROR_THRESHOLD,
        profile=None,
        value=value,
        limit=float(limit.value),
        unit=unit,
        bound="max",
        tripped=tripped,
        sample=size,
        needed=0,
        devices=named,
        detail=detail,
        stage=index,
    )


def _ceil_seconds(value: timedelta) -> timedelta:
    return timedelta(seconds=-(-value // timedelta(seconds=1)))

"""Table-driven tests of the pure rollout policy: thresholds, timeouts, gates, approval,
maintenance windows, the download limit, soak and completion."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pytest
from policy_facts import (
    DL,
    FAIL,
    HOUR,
    NOW,
    OK,
    PEND,
    RB,
    UTC,
    K,
    dev,
    facts,
    later,
    make_spec,
    stage0,
)

from server.rollout.core.cohorts import assign_cohorts
from server.rollout.core.gates import (
    ERROR_THRESHOLD,
    INSTALL_FAILURE_RATE,
    SUCCESS_THRESHOLD,
)
from server.rollout.core.policy import FactsError, RolloutFacts, decide
from server.rollout.core.spec import RolloutSpec
from server.rollout.core.states import (
    Action,
    DeviceFacts,
    InstallStatus,
    RolloutState,
    RolloutStatus,
    apply_action,
)

# --- error and success thresholds --------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "groups", "kind", "tripped"),
    [
        ({"max_failure": "2%"}, [(98, OK), (2, FAIL)], K.ADVANCE, None),  # at the limit
        ({"max_failure": "2%"}, [(97, OK), (3, FAIL)], K.PAUSE, ERROR_THRESHOLD),  # just past
        ({"max_failure": "3"}, [(97, OK), (3, RB)], K.ADVANCE, None),
        ({"max_failure": "3"}, [(96, OK), (4, RB)], K.PAUSE, ERROR_THRESHOLD),
        ({"max_failure": "0"}, [(99, OK), (1, FAIL)], K.PAUSE, ERROR_THRESHOLD),
        ({"max_failure": "0"}, [(100, OK)], K.ADVANCE, None),
        # Default success: everyone outside the failure budget must succeed.
        ({"max_failure": "2%"}, [(97, OK), (2, FAIL), (1, DL)], K.WAIT, None),
        ({"max_failure": "2%"}, [(98, OK), (1, FAIL), (1, DL)], K.ADVANCE, None),
        # Explicit success thresholds, % and count.
        ({"max_failure": "10%", "success": "95%"}, [(95, OK), (5, FAIL)], K.ADVANCE, None),
        ({"max_failure": "10%", "success": "95%"}, [(94, OK), (1, PEND), (5, FAIL)], K.WAIT,
         None),
        ({"max_failure": "10%", "success": "95%"}, [(94, OK), (6, FAIL)], K.PAUSE,
         SUCCESS_THRESHOLD),
        ({"max_failure": "10", "success": "98"}, [(98, OK), (2, FAIL)], K.ADVANCE, None),
        ({"max_failure": "10", "success": "98"}, [(97, OK), (3, FAIL)], K.PAUSE,
         SUCCESS_THRESHOLD),
    ],
)
def test_thresholds(options: dict[str, Any], groups: list[tuple[int, InstallStatus]],
                    kind: K, tripped: str | None) -> None:
    decision = decide(facts(make_spec(**options), stage0(*groups)), NOW)
    assert decision.kind is kind, decision.reason
    assert [g.name for g in decision.tripped] == ([tripped] if tripped else [])
    if kind is K.PAUSE:
        failed = sorted(d for d in decision.tripped[0].devices)
        assert failed and all(d.startswith("rpi4-") for d in failed)
        assert decision.status.state is RolloutState.PAUSED
        assert decision.status.held_devices == set(failed)
        assert tripped is not None and tripped in decision.status.reason


def test_error_threshold_pause_carries_the_numbers() -> None:
    decision = decide(facts(make_spec(max_failure="2%"), stage0((97, OK), (3, FAIL))), NOW)
    gate = decision.tripped[0]
    assert (gate.name, gate.value, gate.limit, gate.unit, gate.sample) == (
        ERROR_THRESHOLD, 3.0, 2.0, "%", 100)
    assert gate.devices == ("rpi4-097", "rpi4-098", "rpi4-099")
    assert gate.stage == 0
    assert "error_threshold in stage 1: 3.0% > limit 2.0% (3 of 100 devices failed)" in (
        decision.reason)
    assert "rpi4-097, rpi4-098, rpi4-099" in decision.status.reason


def test_a_late_failure_in_an_earlier_stage_still_pauses() -> None:
    spec = make_spec(stages="10%,50%,100%", max_failure="0")
    devices = [dev(0, RB), dev(1, stage=1), dev(2, PEND, stage=2, started=None)]
    decision = decide(facts(spec, devices, stage=1), NOW)
    assert decision.kind is K.PAUSE
    (gate,) = decision.tripped
    assert (gate.name, gate.stage, gate.devices) == (ERROR_THRESHOLD, 0, ("rpi4-000",))
    holding = [g for g in decision.gates if g.name == ERROR_THRESHOLD and g.stage == 1]
    assert holding and not holding[0].tripped and not holding[0].devices


# --- timeouts: silent devices count as failed --------------------------------------------


@pytest.mark.parametrize(
    ("device", "outcome"),
    [
        (dev(0, PEND, started=NOW - HOUR, seen=None), "in_flight"),  # exactly the timeout
        (dev(0, PEND, started=NOW - HOUR - timedelta(seconds=1), seen=None), "silent"),
        (dev(0, DL, started=NOW - 3 * HOUR, seen=NOW - HOUR - timedelta(seconds=1)), "silent"),
        (dev(0, DL, started=NOW - 3 * HOUR, seen=NOW - timedelta(minutes=5)), "in_flight"),
        (dev(0, OK, started=NOW - 3 * HOUR, seen=NOW - 2 * HOUR), "silent"),
        (dev(0, OK, started=NOW - 3 * HOUR, seen=NOW - HOUR), "succeeded"),
        (dev(0, FAIL, started=NOW - 3 * HOUR, seen=NOW - 2 * HOUR), "failed"),
        (dev(0, OK, started=NOW - 3 * HOUR, seen=None), "silent"),
    ],
)
def test_silent_devices_fail_after_the_timeout(device: DeviceFacts, outcome: str) -> None:
    decision = decide(facts(make_spec(timeout="1h", max_failure="0"), [device]), NOW)
    progress = decision.progress[0]
    counts = {"in_flight": progress.in_flight, "succeeded": progress.succeeded,
              "failed": progress.failed - progress.silent, "silent": progress.silent}
    assert counts == {k: int(k == outcome) for k in counts}
    assert (decision.kind is K.PAUSE) is (outcome in ("silent", "failed"))
    if outcome == "silent":
        assert "1 of them silent" in decision.reason


def test_silent_before_install_counts_as_an_install_failure() -> None:
    spec = make_spec(max_failure="100%", max_install_failure="5%", min_sample=1)
    devices = [dev(i) for i in range(9)] + [dev(9, PEND, started=NOW - 2 * HOUR, seen=None)]
    decision = decide(facts(spec, devices), NOW)
    gate = decision.tripped[0]
    assert (gate.name, gate.profile, gate.value, gate.devices) == (
        INSTALL_FAILURE_RATE, "rpi4", 10.0, ("rpi4-009",))


# --- soak, approval, completion -----------------------------------------------------------


@pytest.mark.parametrize(
    ("stage_started", "last_start", "kind", "left"),
    [
        (NOW - timedelta(minutes=29), NOW - timedelta(minutes=29), K.WAIT, "soak: 1m left"),
        (NOW - timedelta(minutes=30), NOW - timedelta(minutes=30), K.ADVANCE, None),
        (NOW - 2 * HOUR, NOW - timedelta(minutes=10), K.WAIT, "soak: 20m left"),
        (NOW - 2 * HOUR, NOW - timedelta(minutes=29, seconds=30), K.WAIT, "soak: 30s left"),
    ],
)
def test_soak_counts_from_the_last_device_started(stage_started: datetime, last_start: datetime,
                                                  kind: K, left: str | None) -> None:
    devices = [dev(0, started=stage_started), dev(1, started=last_start), later()]
    decision = decide(facts(make_spec(soak="30m"), devices, stage_started=stage_started), NOW)
    assert decision.kind is kind
    assert (left in decision.waiting) if left else not decision.waiting


def test_approval_between_stages() -> None:
    spec = make_spec(stages="50%,100%", approval=True, soak="0s")
    devices = [dev(0), dev(1, PEND, stage=1, started=None)]
    first = decide(facts(spec, devices), NOW)
    soon = NOW + timedelta(minutes=30)  # within the devices' timeout
    assert first.kind is K.AWAIT_APPROVAL and not first.start
    assert first.status.state is RolloutState.AWAITING_APPROVAL
    assert "waiting for operator approval of stage 2" in first.status.reason
    waiting = RolloutFacts("rollout-1", spec, first.status, devices)
    assert decide(waiting, soon).kind is K.NONE
    assert not decide(waiting, soon).start
    approved = apply_action(first.status, Action.APPROVE, soon, len(spec.stages))
    after = decide(RolloutFacts("rollout-1", spec, approved, devices), soon)
    assert after.kind is K.WAIT and after.start == ("rpi4-001",)
    # The last stage needs no approval: it completes.
    done = [dev(0), dev(1, stage=1, started=NOW)]
    final = decide(RolloutFacts("rollout-1", spec, approved, done), soon)
    assert final.kind is K.COMPLETE and final.status.state is RolloutState.COMPLETED


def test_without_approval_the_stage_advances() -> None:
    spec = make_spec(stages="50%,100%", soak="0s")
    devices = [dev(0), dev(1, PEND, stage=1, started=None)]
    decision = decide(facts(spec, devices), NOW)
    assert decision.kind is K.ADVANCE
    assert (decision.status.stage_index, decision.status.stage_started_at) == (1, NOW)


def test_a_gate_still_trips_while_awaiting_approval() -> None:
    spec = make_spec(stages="50%,100%", approval=True, max_failure="0")
    devices = [dev(0, FAIL), dev(1, PEND, stage=1, started=None)]
    decision = decide(facts(spec, devices, state=RolloutState.AWAITING_APPROVAL), NOW)
    assert decision.kind is K.PAUSE and decision.status.state is RolloutState.PAUSED


def test_empty_stages_are_skipped() -> None:
    spec = make_spec(stages="1%,10%,50%,100%", approval=True, soak="0s")
    # Three devices: stage sizes 1, 1, 2, 3 -> stage 2 (index 1) is empty.
    devices = [dev(0), dev(1, PEND, stage=2, started=None), dev(2, PEND, stage=3, started=None)]
    waiting = decide(facts(spec, devices), NOW)
    assert waiting.kind is K.AWAIT_APPROVAL
    approved = apply_action(waiting.status, Action.APPROVE, NOW, 4)
    assert approved.stage_index == 1
    skip = decide(RolloutFacts("rollout-1", spec, approved, devices), NOW)
    assert (skip.kind, skip.status.stage_index) == (K.ADVANCE, 2)


def test_one_device_fleet_completes_after_its_only_stage() -> None:
    spec = make_spec(stages="1%,10%,50%,100%", approval=True, soak="0s")
    assert decide(facts(spec, [dev(0)]), NOW).kind is K.COMPLETE


@pytest.mark.parametrize(
    "state", [RolloutState.DRAFT, RolloutState.PAUSED, RolloutState.COMPLETED,
              RolloutState.ABORTED, RolloutState.REVERTED])
def test_idle_states_start_nothing(state: RolloutState) -> None:
    devices = [dev(i, PEND, started=None) for i in range(5)] + [dev(9, FAIL)]
    decision = decide(facts(make_spec(max_failure="0"), devices, state=state), NOW)
    assert (decision.kind, decision.start) == (K.NONE, ())
    assert decision.status == facts(make_spec(), [], state=state).status


def test_resume_acknowledges_and_does_not_pause_again() -> None:
    spec = make_spec(max_failure="0", soak="0s")
    devices = [dev(0), dev(1, FAIL), dev("later-2", PEND, stage=1, started=None)]
    paused = decide(facts(spec, devices), NOW)
    assert paused.kind is K.PAUSE and paused.status.held_devices == {"rpi4-001"}
    resumed = apply_action(paused.status, Action.RESUME, NOW, 2)
    again = decide(RolloutFacts("rollout-1", spec, resumed, devices), NOW)
    assert again.kind is K.ADVANCE and again.progress[0].acknowledged == 1
    # A new failure in the stage still pauses.
    worse = [*devices, dev(3, RB)]
    assert decide(RolloutFacts("rollout-1", spec, resumed, worse), NOW).kind is K.PAUSE


# --- maintenance window and download limit ------------------------------------------------


@pytest.mark.parametrize(
    ("now", "opens"),
    [
        (datetime(2026, 1, 10, 12, 0, tzinfo=UTC), False),  # 13:00 in Berlin
        (datetime(2026, 1, 10, 21, 0, tzinfo=UTC), True),  # 22:00 Berlin, the start
        (datetime(2026, 1, 10, 23, 30, tzinfo=UTC), True),  # past midnight in Berlin
        (datetime(2026, 1, 11, 0, 59, tzinfo=UTC), True),
        (datetime(2026, 1, 11, 1, 0, tzinfo=UTC), False),  # 02:00 Berlin: closed
        (datetime(2026, 7, 10, 20, 30, tzinfo=UTC), True),  # summer: 22:30 CEST
        (datetime(2026, 7, 10, 23, 30, tzinfo=UTC), True),  # summer: 01:30 CEST
        (datetime(2026, 7, 11, 0, 0, tzinfo=UTC), False),  # summer: 02:00 CEST
    ],
)
def test_devices_start_only_inside_the_window(now: datetime, opens: bool) -> None:
    spec = make_spec(window_cron="0 22 * * *", window_duration="4h",
                     window_timezone="Europe/Berlin")
    devices = [dev(i, PEND, started=None) for i in range(3)]
    decision = decide(facts(spec, devices, stage_started=now), now)
    assert decision.window_open is opens
    assert len(decision.start) == (3 if opens else 0)
    if not opens:
        assert any(w.startswith("maintenance window closed; opens at") for w in decision.waiting)


@pytest.mark.parametrize(
    ("limit", "busy", "silent_busy", "starts"),
    [(5, 0, 0, 5), (5, 3, 0, 2), (5, 5, 0, 0), (5, 7, 0, 0), (5, 3, 2, 2), (1, 0, 4, 1)],
)
def test_download_limit(limit: int, busy: int, silent_busy: int, starts: int) -> None:
    spec = make_spec(max_concurrent_downloads=limit, max_failure="100%")
    devices = [dev(i, DL, started=NOW - timedelta(minutes=5)) for i in range(busy)]
    devices += [dev(100 + i, PEND, started=NOW - 2 * HOUR, seen=None) for i in range(silent_busy)]
    devices += [dev(200 + i, PEND, started=None) for i in range(10)]
    decision = decide(facts(spec, devices), NOW)
    assert len(decision.start) == starts
    if starts == 0:
        assert any("download limit reached" in w for w in decision.waiting)


def test_start_order_earlier_stages_then_seen_devices_then_rank() -> None:
    spec = make_spec(stages="10%,50%,100%", max_concurrent_downloads=4)
    devices = [
        dev(5, PEND, stage=1, started=None),
        dev(1, PEND, stage=1, started=None, seen=None),  # never seen: last in its stage
        dev(9, PEND, stage=0, started=None),
        dev(3, PEND, stage=1, started=None),
        dev(2, PEND, stage=2, started=None),  # a later stage: not yet
    ]
    decision = decide(facts(spec, devices, stage=1), NOW)
    assert decision.start == ("rpi4-009", "rpi4-003", "rpi4-005", "rpi4-001")


def simulate(spec: RolloutSpec, n: int, limit: int, seed: int) -> tuple[RolloutState, int]:
    """Tick a fleet through the policy; devices install two ticks after being started."""
    rng = np.random.default_rng(seed)
    pool = [DeviceFacts(f"cam-{i}", "rpi4", {"store": f"s{i % 7}"}) for i in range(n)]
    slots = assign_cohorts("sim", pool, spec.stages)
    fleet = {d.device_id: d._replace(stage=slots[d.device_id].stage,
                                     rank=slots[d.device_id].rank, last_seen=NOW) for d in pool}
    now = NOW
    status = apply_action(RolloutStatus(), Action.START, now, len(spec.stages))
    most = 0
    for _ in range(500):
        decision = decide(RolloutFacts("sim", spec, status, list(fleet.values())), now)
        status = decision.status
        for device_id in decision.start:
            fleet[device_id] = fleet[device_id]._replace(status=PEND, started_at=now)
        busy = sum(d.started_at is not None and d.status in (PEND, DL) for d in fleet.values())
        most = max(most, busy)
        assert busy <= limit
        if status.state is not RolloutState.RUNNING:
            break
        now += timedelta(minutes=1)
        for key, d in fleet.items():
            if d.started_at is not None and d.status in (PEND, DL):
                age = (now - d.started_at) // timedelta(minutes=1)
                step = DL if age < 2 + int(rng.integers(2)) else OK
                fleet[key] = d._replace(status=step, last_seen=now)
            else:
                fleet[key] = d._replace(last_seen=now)
    return status.state, most


@pytest.mark.parametrize(("limit", "seed"), [(1, 0), (3, 1), (7, 2), (50, 3)])
def test_download_limit_holds_through_a_whole_rollout(limit: int, seed: int) -> None:
    spec = make_spec(stages="5%,25%,100%", soak="5m", max_concurrent_downloads=limit)
    state, most = simulate(spec, 60, limit, seed)
    assert state is RolloutState.COMPLETED
    assert most == min(limit, 45)  # the limit was reached (the last stage has 45), never passed


# --- facts, determinism and scale ---------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f, now: (f, now.replace(tzinfo=None)), "aware 'now'"),
        (lambda f, now: (replace(f, status=replace(f.status, stage_index=5)), now), "stage 5"),
        (lambda f, now: (replace(f, devices=[dev(0, stage=7)]), now), "stage 7"),
        (lambda f, now: (replace(f, status=replace(f.status, stage_started_at=None)), now),
         "without a start"),
        (lambda f, now: (replace(f, devices=[dev(0, seen=datetime(2026, 1, 1))]), now),
         "timezone-aware"),
    ],
)
def test_inconsistent_facts_are_a_clear_error(mutate: Any, message: str) -> None:
    bad, now = mutate(facts(make_spec(), [dev(0)]), NOW)
    with pytest.raises(FactsError, match=message):
        decide(bad, now)


def test_decide_is_deterministic_and_order_free() -> None:
    spec = make_spec(max_concurrent_downloads=7, max_latency_regression="10%")
    devices = [dev(i, PEND, started=None) for i in range(30)] + [dev(100 + i) for i in range(10)]
    first = decide(facts(spec, devices), NOW)
    shuffled = [devices[i] for i in np.random.default_rng(3).permutation(len(devices))]
    assert decide(facts(spec, shuffled), NOW) == first
    assert len(first.start) == 7
    json.dumps(first.to_json())


def test_decide_over_65000_devices() -> None:
    spec = make_spec(stages="1%,10%,50%,100%", max_latency_regression="10%",
                     max_power_regression="10%", max_install_failure="5%",
                     min_golden_accuracy="90%", max_concurrent_downloads=500)
    profiles = ("rpi4", "rpi5", "jetson", "coral")
    devices = []
    for i in range(65_000):
        stage = 0 if i < 650 else 1 if i < 6_500 else 2 if i < 32_500 else 3
        started = stage <= 2 and i < 30_000
        devices.append(DeviceFacts(
            f"cam-{i:05d}", profiles[i % 4], {}, stage, i,
            OK if started else PEND, NOW - HOUR if started else None, NOW - timedelta(minutes=1),
            10.0, 10.5 if started else None, 2000.0, 2050.0 if started else None,
            0.95 if started else None, 0))
    decision = decide(facts(spec, devices, stage=2), NOW)
    assert decision.kind is K.WAIT and not decision.tripped
    assert len(decision.start) == 500
    assert decision.progress[2].succeeded == 30_000 - 6_500

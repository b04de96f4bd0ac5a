"""The rollout state machine: one transition table, operator actions and engine events."""

from __future__ import annotations

import itertools
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from server.errors import ConflictError, InvalidInputError
from server.rollout.core.states import (
    FINAL,
    TRANSITIONS,
    Action,
    EngineEvent,
    RolloutState,
    RolloutStatus,
    TransitionError,
    Trigger,
    apply_action,
    apply_event,
    next_state,
)

R, A, E = RolloutState, Action, EngineEvent
NOW = datetime(2026, 11, 3, 12, 0, tzinfo=timezone.utc)
ALL_TRIGGERS: list[Trigger] = [*Action, *EngineEvent]

EXPECTED = {
    (R.DRAFT, A.START): R.RUNNING,
    (R.DRAFT, A.ABORT): R.ABORTED,
    (R.RUNNING, A.PAUSE): R.PAUSED,
    (R.RUNNING, A.ABORT): R.ABORTED,
    (R.RUNNING, A.REVERT): R.REVERTED,
    (R.RUNNING, E.STAGE_PASSED): R.RUNNING,
    (R.RUNNING, E.APPROVAL_NEEDED): R.AWAITING_APPROVAL,
    (R.RUNNING, E.GATE_TRIPPED): R.PAUSED,
    (R.RUNNING, E.FINISHED): R.COMPLETED,
    (R.AWAITING_APPROVAL, A.APPROVE): R.RUNNING,
    (R.AWAITING_APPROVAL, A.PAUSE): R.PAUSED,
    (R.AWAITING_APPROVAL, A.ABORT): R.ABORTED,
    (R.AWAITING_APPROVAL, A.REVERT): R.REVERTED,
    (R.AWAITING_APPROVAL, E.GATE_TRIPPED): R.PAUSED,
    (R.PAUSED, A.RESUME): R.RUNNING,
    (R.PAUSED, A.ABORT): R.ABORTED,
    (R.PAUSED, A.REVERT): R.REVERTED,
    (R.COMPLETED, A.REVERT): R.REVERTED,
    (R.ABORTED, A.REVERT): R.REVERTED,
}


def test_table_is_exactly_the_design() -> None:
    assert TRANSITIONS == EXPECTED


@pytest.mark.parametrize(("state", "trigger"), list(itertools.product(RolloutState, ALL_TRIGGERS)))
def test_every_pair_either_moves_or_is_a_clear_conflict(
    state: RolloutState, trigger: Trigger
) -> None:
    if (state, trigger) in EXPECTED:
        assert next_state(state, trigger) is EXPECTED[(state, trigger)]
        return
    with pytest.raises(TransitionError) as info:
        next_state(state, trigger)
    assert isinstance(info.value, ConflictError) and info.value.status == 409
    assert f"cannot {trigger.value} a rollout that is {state.value}" in str(info.value)


@pytest.mark.parametrize(
    ("state", "allowed"),
    [
        (R.DRAFT, "start, abort"),
        (R.RUNNING, "pause, abort, revert"),
        (R.PAUSED, "resume, abort, revert"),
        (R.AWAITING_APPROVAL, "approve, pause, abort, revert"),
        (R.REVERTED, "nothing (it is final)"),
    ],
)
def test_conflict_message_lists_what_the_operator_may_do(state: RolloutState, allowed: str) -> None:
    with pytest.raises(TransitionError, match=rf"allowed now: {re.escape(allowed)}$"):
        next_state(state, A.APPROVE if state is not R.AWAITING_APPROVAL else A.RESUME)


def test_action_and_event_values_never_collide() -> None:
    # str enums with equal values would be equal dict keys in the one table.
    assert not {a.value for a in Action} & {e.value for e in EngineEvent}


def test_final_states_never_move_again_except_revert() -> None:
    for state in FINAL:
        moves = {t for (s, t) in TRANSITIONS if s is state}
        assert moves <= {A.REVERT}
    assert not [t for (s, t) in TRANSITIONS if s is R.REVERTED]


def run(actions: list[tuple[Any, ...]], stages: int = 4) -> list[tuple[str, int]]:
    """Apply actions and events in turn; record (state, stage) after each."""
    status, seen = RolloutStatus(), []
    for step, (kind, *args) in enumerate(actions):
        now = NOW + timedelta(minutes=step)
        if isinstance(kind, Action):
            status = apply_action(status, kind, now, stages)
        else:
            status = apply_event(status, kind, now, "engine", **(args[0] if args else {}))
        seen.append((status.state.value, status.stage_index))
    return seen


@pytest.mark.parametrize(
    ("steps", "path"),
    [
        (
            [(A.START,), (E.STAGE_PASSED, {"next_stage": 1}), (E.STAGE_PASSED, {"next_stage": 3}),
             (E.FINISHED,)],
            [("running", 0), ("running", 1), ("running", 3), ("completed", 3)],
        ),
        (
            [(A.START,), (E.APPROVAL_NEEDED,), (A.APPROVE,), (E.APPROVAL_NEEDED,), (A.APPROVE,)],
            [("running", 0), ("awaiting_approval", 0), ("running", 1),
             ("awaiting_approval", 1), ("running", 2)],
        ),
        (
            [(A.START,), (E.GATE_TRIPPED,), (A.RESUME,), (A.PAUSE,), (A.RESUME,), (A.ABORT,),
             (A.REVERT,)],
            [("running", 0), ("paused", 0), ("running", 0), ("paused", 0), ("running", 0),
             ("aborted", 0), ("reverted", 0)],
        ),
        (
            [(A.START,), (E.APPROVAL_NEEDED,), (E.GATE_TRIPPED,), (A.RESUME,)],
            [("running", 0), ("awaiting_approval", 0), ("paused", 0), ("running", 0)],
        ),
        (
            [(A.START,), (E.FINISHED,), (A.REVERT,)],
            [("running", 0), ("completed", 0), ("reverted", 0)],
        ),
    ],
    ids=["happy", "approvals", "pause-resume-abort-revert", "trip-while-waiting", "late-revert"],
)
def test_chains(steps: list[tuple[Any, ...]], path: list[tuple[str, int]]) -> None:
    assert run(steps) == path


def test_start_and_approve_restart_the_stage_clock() -> None:
    status = apply_action(RolloutStatus(), A.START, NOW, 3)
    assert status.stage_started_at == NOW
    waiting = apply_event(status, E.APPROVAL_NEEDED, NOW + timedelta(hours=1), "passed")
    approved = apply_action(waiting, A.APPROVE, NOW + timedelta(hours=2), 3)
    assert (approved.stage_index, approved.stage_started_at) == (1, NOW + timedelta(hours=2))


def test_approve_past_the_last_stage_is_refused() -> None:
    status = RolloutStatus(R.AWAITING_APPROVAL, 2, NOW)
    with pytest.raises(TransitionError):
        apply_action(status, A.APPROVE, NOW, 3)


def test_stage_passed_needs_a_later_stage() -> None:
    status = RolloutStatus(R.RUNNING, 1, NOW)
    with pytest.raises(ValueError, match="later next_stage"):
        apply_event(status, E.STAGE_PASSED, NOW, "x", next_stage=1)


def test_resume_acknowledges_the_devices_that_paused_it() -> None:
    status = apply_action(RolloutStatus(), A.START, NOW, 2)
    paused = apply_event(status, E.GATE_TRIPPED, NOW, "latency", held_devices=["cam-2", "cam-1"])
    assert paused.held_devices == {"cam-1", "cam-2"} and paused.reason == "latency"
    resumed = apply_action(paused, A.RESUME, NOW, 2)
    assert resumed.acknowledged == {"cam-1", "cam-2"} and not resumed.held_devices
    again = apply_action(apply_event(resumed, E.GATE_TRIPPED, NOW, "x", held_devices=["cam-3"]),
                         A.RESUME, NOW, 2)
    assert again.acknowledged == {"cam-1", "cam-2", "cam-3"}


def test_operator_pause_twice_is_a_conflict() -> None:
    paused = apply_action(apply_action(RolloutStatus(), A.START, NOW, 2), A.PAUSE, NOW, 2)
    with pytest.raises(TransitionError, match="cannot pause a rollout that is paused"):
        apply_action(paused, A.PAUSE, NOW, 2)


def test_status_round_trips_through_json() -> None:
    status = RolloutStatus(R.PAUSED, 2, NOW, "gate", frozenset({"b", "a"}), frozenset({"c"}))
    assert RolloutStatus.from_json(status.to_json()) == status
    assert RolloutStatus.from_json(RolloutStatus().to_json()) == RolloutStatus()
    naive = {"state": "running", "stage_started_at": "2026-11-03T12:00:00"}
    assert RolloutStatus.from_json(naive).stage_started_at == NOW


@pytest.mark.parametrize(
    "garbage",
    [None, [], {}, {"state": "flying"}, {"state": "running", "stage_index": "x"},
     {"state": "running", "stage_started_at": "yesterday"}],
)
def test_status_garbage_is_rejected(garbage: Any) -> None:
    with pytest.raises(InvalidInputError, match="rollout status"):
        RolloutStatus.from_json(garbage)

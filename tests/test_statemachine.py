"""Table-driven tests of the update state machine (pure part)."""

from __future__ import annotations

import pytest

from agent.common.errors import AgentError
from agent.update.state_machine import (
    DURABLE,
    TRANSITIONS,
    Event,
    State,
    TransitionError,
    UpdateRecord,
    next_state,
)

S, E = State, Event

HAPPY = [E.START, E.UPDATE_AVAILABLE, E.SUCCESS, E.SUCCESS, E.SUCCESS, E.SUCCESS, E.SUCCESS, E.DONE]


def run(events: list[Event]) -> list[State]:
    state, seen = S.IDLE, [S.IDLE]
    for event in events:
        state = next_state(state, event)
        seen.append(state)
    return seen


@pytest.mark.parametrize(
    ("events", "path"),
    [
        (
            HAPPY,
            [
                S.IDLE,
                S.CHECK_IN,
                S.DOWNLOAD,
                S.VERIFY,
                S.INSTALL,
                S.SMOKE_TEST,
                S.HEALTH,
                S.COMMIT,
                S.IDLE,
            ],
        ),
        ([E.START, E.NO_UPDATE], [S.IDLE, S.CHECK_IN, S.IDLE]),
        ([E.START, E.FAILURE], [S.IDLE, S.CHECK_IN, S.IDLE]),
        ([E.START, E.UPDATE_AVAILABLE, E.FAILURE], [S.IDLE, S.CHECK_IN, S.DOWNLOAD, S.IDLE]),
        (
            [E.START, E.UPDATE_AVAILABLE, E.SUCCESS, E.FAILURE],
            [S.IDLE, S.CHECK_IN, S.DOWNLOAD, S.VERIFY, S.IDLE],
        ),
        (
            [E.START, E.UPDATE_AVAILABLE, E.SUCCESS, E.SUCCESS, E.FAILURE],
            [S.IDLE, S.CHECK_IN, S.DOWNLOAD, S.VERIFY, S.INSTALL, S.IDLE],
        ),
        (
            [E.START, E.UPDATE_AVAILABLE, E.SUCCESS, E.SUCCESS, E.SUCCESS, E.FAILURE, E.DONE],
            [S.IDLE, S.CHECK_IN, S.DOWNLOAD, S.VERIFY, S.INSTALL, S.SMOKE_TEST, S.ROLLBACK, S.IDLE],
        ),
        (
            [
                E.START,
                E.UPDATE_AVAILABLE,
                E.SUCCESS,
                E.SUCCESS,
                E.SUCCESS,
                E.SUCCESS,
                E.FAILURE,
                E.DONE,
            ],
            [
                S.IDLE,
                S.CHECK_IN,
                S.DOWNLOAD,
                S.VERIFY,
                S.INSTALL,
                S.SMOKE_TEST,
                S.HEALTH,
                S.ROLLBACK,
                S.IDLE,
            ],
        ),
    ],
    ids=[
        "happy",
        "no-update",
        "checkin-fails",
        "download-fails",
        "verify-fails",
        "install-fails",
        "smoke-fails",
        "health-fails",
    ],
)
def test_chains(events: list[Event], path: list[State]) -> None:
    assert run(events) == path


# A restart resumes the steps that are idempotent and rolls back once the new
# model may have been running.
@pytest.mark.parametrize(
    ("state", "after"),
    [
        (S.IDLE, S.IDLE),
        (S.CHECK_IN, S.IDLE),
        (S.DOWNLOAD, S.DOWNLOAD),
        (S.VERIFY, S.VERIFY),
        (S.INSTALL, S.INSTALL),
        (S.SMOKE_TEST, S.ROLLBACK),
        (S.HEALTH, S.ROLLBACK),
        (S.COMMIT, S.COMMIT),
        (S.ROLLBACK, S.ROLLBACK),
    ],
)
def test_restart(state: State, after: State) -> None:
    assert next_state(state, E.RESTARTED) == after


def test_every_state_handles_restart_and_every_busy_state_can_fail_or_finish() -> None:
    for state in State:
        assert (state, E.RESTARTED) in TRANSITIONS
        if state is not S.IDLE:
            assert (state, E.FAILURE) in TRANSITIONS or (state, E.DONE) in TRANSITIONS


def test_durable_states_are_exactly_the_work_states() -> None:
    assert set(State) - DURABLE == {S.IDLE, S.CHECK_IN}


@pytest.mark.parametrize(
    ("state", "event"), [(S.IDLE, E.SUCCESS), (S.COMMIT, E.NO_UPDATE), (S.DOWNLOAD, E.DONE)]
)
def test_illegal_events_are_refused(state: State, event: Event) -> None:
    with pytest.raises(TransitionError, match=event.value):
        next_state(state, event)


def test_record_round_trips_and_keeps_a_bounded_trail() -> None:
    rec = UpdateRecord()
    for event in HAPPY * 5:
        rec = rec.advance(event, target_path="models/x/1/int8-cpu.tflite")
    assert rec.state is S.IDLE
    assert len(rec.history) == 20
    again = UpdateRecord.from_json(rec.to_json())
    assert again == rec


@pytest.mark.parametrize(
    "garbage", [None, [], {"state": "nope"}, {"state": "idle", "attempts": "x"}]
)
def test_corrupt_record_is_refused(garbage: object) -> None:
    with pytest.raises(AgentError):
        UpdateRecord.from_json(garbage)


def test_commit_and_rollback_have_a_failure_path() -> None:
    # A commit that cannot finish is undone; a rollback that cannot finish ends the update.
    assert next_state(S.COMMIT, E.FAILURE) is S.ROLLBACK
    assert next_state(S.ROLLBACK, E.FAILURE) is S.IDLE
    # Every state with work has a way out on failure, so no failure can strand the agent.
    for state in S:
        if state is not S.IDLE:
            next_state(state, E.FAILURE)

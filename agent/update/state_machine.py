"""The update state machine: one State enum, one Event enum, one transition table.

This module is pure. The updater performs each state's work, turns its outcome
into an Event and asks ``next_state`` where to go; the persisted record lets a
restarted agent resume (download, verify, install) or roll back (anything after
the new model was switched in), Mender style.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

from agent.common.errors import AgentError


class State(str, enum.Enum):
    IDLE = "idle"
    CHECK_IN = "check_in"
    DOWNLOAD = "download"
    VERIFY = "verify"
    INSTALL = "install"
    SMOKE_TEST = "smoke_test"
    HEALTH = "health"
    COMMIT = "commit"
    ROLLBACK = "rollback"


class Event(str, enum.Enum):
    START = "start"
    NO_UPDATE = "no_update"
    UPDATE_AVAILABLE = "update_available"
    SUCCESS = "success"
    FAILURE = "failure"
    RESTARTED = "restarted"
    DONE = "done"


class TransitionError(AgentError):
    """An event arrived that the table does not allow in the current state."""


S, E = State, Event

RECORD_VERSION = 1  # the persisted record's layout; a record of another version is not resumed
MAX_RESTARTS = 3  # restarts in one update before its state is treated as failed

TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.IDLE, E.START): S.CHECK_IN,
    (S.CHECK_IN, E.NO_UPDATE): S.IDLE,
    (S.CHECK_IN, E.UPDATE_AVAILABLE): S.DOWNLOAD,
    (S.CHECK_IN, E.FAILURE): S.IDLE,
    (S.DOWNLOAD, E.SUCCESS): S.VERIFY,
    (S.DOWNLOAD, E.FAILURE): S.IDLE,
    (S.VERIFY, E.SUCCESS): S.INSTALL,
    (S.VERIFY, E.FAILURE): S.IDLE,
    (S.INSTALL, E.SUCCESS): S.SMOKE_TEST,
    (S.INSTALL, E.FAILURE): S.IDLE,
    (S.SMOKE_TEST, E.SUCCESS): S.HEALTH,
    (S.SMOKE_TEST, E.FAILURE): S.ROLLBACK,
    (S.HEALTH, E.SUCCESS): S.COMMIT,
    (S.HEALTH, E.FAILURE): S.ROLLBACK,
    (S.COMMIT, E.DONE): S.IDLE,
    # A commit that cannot finish is undone; a rollback that cannot finish stops, and the
    # device keeps whichever slot is active (the reason says why).
    (S.COMMIT, E.FAILURE): S.ROLLBACK,
    (S.ROLLBACK, E.DONE): S.IDLE,
    (S.ROLLBACK, E.FAILURE): S.IDLE,
    # After a restart: steps before the switch resume (each is idempotent); a
    # restart while the new model was being tested counts as its failure.
    (S.IDLE, E.RESTARTED): S.IDLE,
    (S.CHECK_IN, E.RESTARTED): S.IDLE,
    (S.DOWNLOAD, E.RESTARTED): S.DOWNLOAD,
    (S.VERIFY, E.RESTARTED): S.VERIFY,
    (S.INSTALL, E.RESTARTED): S.INSTALL,
    (S.SMOKE_TEST, E.RESTARTED): S.ROLLBACK,
    (S.HEALTH, E.RESTARTED): S.ROLLBACK,
    (S.COMMIT, E.RESTARTED): S.COMMIT,
    (S.ROLLBACK, E.RESTARTED): S.ROLLBACK,
}

# States whose entry must be on disk before their work starts.
DURABLE = frozenset({S.DOWNLOAD, S.VERIFY, S.INSTALL, S.SMOKE_TEST, S.HEALTH, S.COMMIT, S.ROLLBACK})


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TransitionError(
            f"event {event.value!r} is not allowed in state {state.value!r}"
        ) from None


@dataclass(frozen=True)
class UpdateRecord:
    """What is persisted: the state plus everything needed to resume it."""

    state: State = State.IDLE
    target_path: str | None = None
    desired: dict[str, Any] | None = None
    update_id: str | None = None
    target_sha256: str | None = None
    target_length: int | None = None
    manifest: dict[str, Any] | None = None
    slot: str | None = None
    previous_slot: str | None = None
    via: str | None = None
    bytes_downloaded: int = 0
    attempts: int = 0
    reason: str | None = None
    history: tuple[str, ...] = field(default_factory=tuple)
    restarts: int = 0  # restarts during this update: a state that keeps crashing is abandoned

    def advance(self, event: Event, **changes: Any) -> UpdateRecord:
        new = next_state(self.state, event)
        trail = (*self.history[-19:], f"{self.state.value}-{event.value}->{new.value}")
        return replace(self, state=new, history=trail, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "state": self.state.value,
            "target_path": self.target_path,
            "desired": self.desired,
            "update_id": self.update_id,
            "target_sha256": self.target_sha256,
            "target_length": self.target_length,
            "manifest": self.manifest,
            "slot": self.slot,
            "previous_slot": self.previous_slot,
            "via": self.via,
            "bytes_downloaded": self.bytes_downloaded,
            "attempts": self.attempts,
            "reason": self.reason,
            "history": list(self.history),
            "restarts": self.restarts,
        }

    @classmethod
    def from_json(cls, data: Any) -> UpdateRecord:
        if not isinstance(data, dict):
            raise AgentError("update record is not an object")
        version = data.get("version", 1)
        if version != RECORD_VERSION:  # written by another agent version: do not guess
            raise AgentError(f"update record version {version!r} is not {RECORD_VERSION}")
        try:
            return cls(
                state=State(data["state"]),
                target_path=data.get("target_path"),
                desired=data.get("desired"),
                update_id=data.get("update_id"),
                target_sha256=data.get("target_sha256"),
                target_length=data.get("target_length"),
                manifest=data.get("manifest"),
                slot=data.get("slot"),
                previous_slot=data.get("previous_slot"),
                via=data.get("via"),
                bytes_downloaded=int(data.get("bytes_downloaded", 0)),
                attempts=int(data.get("attempts", 0)),
                reason=data.get("reason"),
                history=tuple(data.get("history", ())),
                restarts=int(data.get("restarts", 0)),
            )
        except (KeyError, ValueError, TypeError) as err:
            raise AgentError(f"update record is corrupt: {err}") from err

    def cleared(self) -> UpdateRecord:
        """Back to a blank IDLE record, keeping the trail for diagnostics."""
        return UpdateRecord(state=State.IDLE, history=self.history, reason=self.reason)

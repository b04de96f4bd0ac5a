"""Rollout states, operator actions, engine events and the one transition table.

Pure: no IO. The REST handlers turn an operator request into an ``Action`` and
call ``apply_action``; the scheduler loop stores ``Decision.status`` from the
policy, which was built with ``apply_event``. Both go through ``next_state``,
so a request the table does not allow is a ``TransitionError`` (HTTP 409).

``DeviceFacts`` lives here too: it is the per-device record (install status and
measurements) that the cohort assignment and the policy read.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, NamedTuple

from server.errors import ConflictError, InvalidInputError


class RolloutState(str, enum.Enum):
    DRAFT = "draft"
    RUNNING = "running"
    AWAITING_APPROVAL = "awaiting_approval"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    REVERTED = "reverted"


class Action(str, enum.Enum):
    """What an operator asks for."""

    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    APPROVE = "approve"
    ABORT = "abort"
    REVERT = "revert"


class EngineEvent(str, enum.Enum):
    """What the policy concludes from the stored facts."""

    STAGE_PASSED = "stage_passed"
    APPROVAL_NEEDED = "approval_needed"
    GATE_TRIPPED = "gate_tripped"
    FINISHED = "finished"


class InstallStatus(str, enum.Enum):
    """Where one device stands with the rollout's release."""

    PENDING = "pending"
    DOWNLOADING = "downloading"
    INSTALLED = "installed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


Trigger = Action | EngineEvent
R, A, E = RolloutState, Action, EngineEvent

TRANSITIONS: dict[tuple[RolloutState, Trigger], RolloutState] = {
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
    # Devices keep reporting while the operator decides; a late failure still pauses.
    (R.AWAITING_APPROVAL, E.GATE_TRIPPED): R.PAUSED,
    (R.PAUSED, A.RESUME): R.RUNNING,
    (R.PAUSED, A.ABORT): R.ABORTED,
    (R.PAUSED, A.REVERT): R.REVERTED,
    # A finished or stopped rollout may still turn out bad: it can be reverted.
    (R.COMPLETED, A.REVERT): R.REVERTED,
    (R.ABORTED, A.REVERT): R.REVERTED,
}

# States in which the engine starts no more devices and never acts again.
FINAL = frozenset({R.COMPLETED, R.ABORTED, R.REVERTED})


def allowed_triggers(state: RolloutState) -> list[str]:
    return [trigger.value for (s, trigger) in TRANSITIONS if s is state]


class TransitionError(ConflictError):
    """The table does not allow this action or event in the rollout's state."""

    def __init__(self, state: RolloutState, trigger: Trigger) -> None:
        self.state = state
        self.trigger = trigger
        actions = [t for t in allowed_triggers(state) if t in {a.value for a in Action}]
        allowed = ", ".join(actions) if actions else "nothing (it is final)"
        super().__init__(
            f"cannot {trigger.value} a rollout that is {state.value}; allowed now: {allowed}"
        )


def next_state(state: RolloutState, trigger: Trigger) -> RolloutState:
    try:
        return TRANSITIONS[(state, trigger)]
    except KeyError:
        raise TransitionError(state, trigger) from None


@dataclass(frozen=True)
class RolloutStatus:
    """The rollout's mutable part, as the scheduler stores it between ticks.

    ``held_devices`` are the devices named by the gate that paused the rollout;
    resuming acknowledges them, and the policy leaves acknowledged devices out
    of every threshold and gate from then on, so a resume does not re-pause on
    the very same devices.
    """

    state: RolloutState = RolloutState.DRAFT
    stage_index: int = 0
    stage_started_at: datetime | None = None
    reason: str = ""
    held_devices: frozenset[str] = frozenset()
    acknowledged: frozenset[str] = frozenset()
    shadow_done: int = -1  # the last stage whose shadow phase is over
    shadow_tripped: bool = False  # paused by a shadow gate: a resume accepts the candidate
    # The gates that paused it, as they stood then (later ticks keep the live table current).
    paused_gates: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "stage_index": self.stage_index,
            "stage_started_at": (
                self.stage_started_at.isoformat() if self.stage_started_at else None
            ),
            "reason": self.reason,
            "held_devices": sorted(self.held_devices),
            "acknowledged": sorted(self.acknowledged),
            "shadow_done": self.shadow_done,
            "shadow_tripped": self.shadow_tripped,
            "paused_gates": list(self.paused_gates),
        }

    @classmethod
    def from_json(cls, data: Any) -> RolloutStatus:
        if not isinstance(data, dict):
            raise InvalidInputError("rollout status must be an object")
        try:
            text = data.get("stage_started_at")
            started = datetime.fromisoformat(text) if text else None
            if started is not None and started.tzinfo is None:
                started = started.replace(tzinfo=timezone.utc)  # stored times are UTC
            return cls(
                state=RolloutState(data["state"]),
                stage_index=int(data.get("stage_index", 0)),
                stage_started_at=started,
                reason=str(data.get("reason", "")),
                held_devices=frozenset(str(d) for d in data.get("held_devices", ())),
                acknowledged=frozenset(str(d) for d in data.get("acknowledged", ())),
                shadow_done=int(data.get("shadow_done", -1)),
                shadow_tripped=bool(data.get("shadow_tripped", False)),
                paused_gates=tuple(g for g in data.get("paused_gates", ()) if isinstance(g, dict)),
            )
        except (KeyError, ValueError, TypeError) as err:
            raise InvalidInputError(f"rollout status is invalid: {err}") from err


def apply_action(
    status: RolloutStatus, action: Action, now: datetime, stage_count: int
) -> RolloutStatus:
    """An operator action applied to the stored status (or a TransitionError)."""
    new = next_state(status.state, action)
    if action is A.START:
        return RolloutStatus(new, 0, now, "started by operator")
    if action is A.APPROVE:
        if status.stage_index + 1 >= stage_count:
            raise TransitionError(status.state, action)
        return replace(
            status,
            state=new,
            stage_index=status.stage_index + 1,
            stage_started_at=now,
            reason=f"stage {status.stage_index + 1} approved by operator",
        )
    if action is A.RESUME:
        # Resuming a shadow pause is the operator accepting the candidate for this stage.
        accepted = status.shadow_tripped
        return replace(
            status,
            state=new,
            reason="resumed by operator" + ("; shadow result accepted" if accepted else ""),
            held_devices=frozenset(),
            acknowledged=status.acknowledged | status.held_devices,
            shadow_done=status.stage_index if accepted else status.shadow_done,
            shadow_tripped=False,
            paused_gates=(),
        )
    return replace(status, state=new, reason=f"{new.value} by operator", held_devices=frozenset())


def apply_event(
    status: RolloutStatus,
    event: EngineEvent,
    now: datetime,
    reason: str,
    *,
    next_stage: int | None = None,
    held_devices: Iterable[str] = (),
    shadow: bool = False,
    gates: Iterable[dict[str, Any]] = (),
) -> RolloutStatus:
    """An engine event applied to the stored status (or a TransitionError)."""
    new = next_state(status.state, event)
    if event is E.STAGE_PASSED:
        if next_stage is None or next_stage <= status.stage_index:
            raise ValueError("a passed stage needs a later next_stage")
        return replace(
            status, state=new, stage_index=next_stage, stage_started_at=now, reason=reason
        )
    return replace(
        status,
        state=new,
        reason=reason,
        held_devices=frozenset(held_devices),
        shadow_tripped=shadow and event is E.GATE_TRIPPED,
        paused_gates=tuple(gates) if event is E.GATE_TRIPPED else (),
    )


_NO_TAGS: Mapping[str, str] = MappingProxyType({})


class DeviceFacts(NamedTuple):
    """One device of a rollout, as stored: placement, install status, measurements.

    A NamedTuple rather than a frozen dataclass: the scheduler builds 65,000 of
    these a tick, and a tuple is built about four times faster.
    ``started_at`` is when the engine told the device to install (None: not yet).
    The ``baseline_*`` values are the device's own p95 invoke latency and mean
    power on its previous release; ``p95_ms``/``power_mw`` come only from windows
    in which it ran this rollout's release. ``error_count`` counts runtime errors
    since the install. Times are timezone-aware (UTC).
    """

    device_id: str
    profile: str = ""
    tags: Mapping[str, str] = _NO_TAGS
    stage: int = 0
    rank: int = 0
    status: InstallStatus = InstallStatus.PENDING
    started_at: datetime | None = None
    last_seen: datetime | None = None
    baseline_p95_ms: float | None = None
    p95_ms: float | None = None
    baseline_power_mw: float | None = None
    power_mw: float | None = None
    golden_accuracy: float | None = None
    error_count: int = 0

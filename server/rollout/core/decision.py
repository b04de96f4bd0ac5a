"""What one policy step concludes: the decision kinds, stage progress, the decision.

Pure: no IO. Built by ``policy.decide``; the engine applies it and stores its JSON.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from server.rollout.core.gates import GateResult
from server.rollout.core.states import RolloutStatus


class DecisionKind(str, enum.Enum):
    NONE = "none"  # draft, paused, awaiting approval or final: nothing changes
    WAIT = "wait"  # running; maybe starting devices
    ADVANCE = "advance"
    AWAIT_APPROVAL = "await_approval"
    SHADOW_PASSED = "shadow_passed"  # the stage's shadow phase passed; installs start next
    PAUSE = "pause"
    COMPLETE = "complete"


@dataclass(frozen=True)
class StageProgress:
    stage: int
    devices: int
    not_started: int
    in_flight: int
    succeeded: int
    failed: int  # silent ones included
    silent: int
    acknowledged: int

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    status: RolloutStatus  # store this (it equals the input status when nothing changed)
    start: tuple[str, ...]  # tell these devices to install now, in this order
    reason: str
    tripped: tuple[GateResult, ...]
    gates: tuple[GateResult, ...]
    progress: tuple[StageProgress, ...]
    waiting: tuple[str, ...]  # why the stage has not passed yet
    window_open: bool
    shadow: tuple[str, ...] = ()  # devices that should shadow the candidate now

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "status": self.status.to_json(),
            "start": list(self.start),
            "reason": self.reason,
            "tripped": [g.to_json() for g in self.tripped],
            "gates": [g.to_json() for g in self.gates],
            "progress": [p.to_json() for p in self.progress],
            "waiting": list(self.waiting),
            "window_open": self.window_open,
            "shadowing": len(self.shadow),
        }

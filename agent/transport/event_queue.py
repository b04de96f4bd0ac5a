"""The HTTP copy of update events, queued and sent in batches (``EVENTS_BATCH_PATH``).

Every event also goes out on MQTT at once, so this queue only decides when the
HTTP copies are worth a request: when an update ends, when a full batch is
waiting, or when the oldest event has waited ``max_age_s`` (a long download
still shows progress). Pure: no IO, the clock is injected. The agent and the
fleet simulator share it, so 65,000 simulated devices batch exactly as a camera.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.common.errors import AgentError, ServerRequestError
from agent.protocol.api import MAX_EVENT_BATCH
from agent.update.state_machine import State

DEFAULT_MAX_AGE_S = 30.0
DEFAULT_CAPACITY = 1000

# Every way out of an update lands in idle: commit and rollback finish with DONE,
# failures before the switch go straight back. The table has no other end state.
END_STATES = frozenset({State.IDLE.value})

# Answers that say the batch itself is bad: sending it again cannot help, and it
# would block everything queued behind it. Anything else (unreachable, 401/403,
# 404 before the server has the endpoint, 5xx) is worth a retry.
REJECTED_STATUSES = frozenset({400, 413, 422})


@dataclass(frozen=True, slots=True)
class PendingEvent:
    kind: str
    state: str
    detail: dict[str, Any]
    queued_at: float

    @property
    def ends_update(self) -> bool:
        return self.kind == "update" and self.state in END_STATES

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, "state": self.state, "detail": self.detail}


def batch_body(batch: Sequence[PendingEvent]) -> dict[str, Any]:
    """The wire body of one batch POST: 1..MAX_EVENT_BATCH events, oldest first."""
    if not 1 <= len(batch) <= MAX_EVENT_BATCH:
        raise ValueError(f"a batch holds 1..{MAX_EVENT_BATCH} events, not {len(batch)}")
    return {"events": [event.to_json() for event in batch]}


class EventQueue:
    """Bounded FIFO of events waiting for HTTP, with the flush policy.

    A list, not a deque: the simulator holds one per device and most are empty.
    """

    __slots__ = ("_clock", "_items", "capacity", "dropped", "max_age_s")

    def __init__(
        self,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < MAX_EVENT_BATCH:
            raise ValueError(f"capacity must hold at least one batch ({MAX_EVENT_BATCH})")
        self.max_age_s = max_age_s
        self.capacity = capacity
        self.dropped = 0  # events given up on: overflow, or a batch the server rejected
        self._clock = clock
        self._items: list[PendingEvent] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, kind: str, state: str, detail: dict[str, Any]) -> bool:
        """Queue one event; True when a flush is now due."""
        self._items.append(PendingEvent(kind, state, detail, self._clock()))
        self._trim()
        return self.due()

    def due(self) -> bool:
        items = self._items
        if not items:
            return False
        return (
            items[-1].ends_update
            or len(items) >= MAX_EVENT_BATCH
            or self._clock() - items[0].queued_at >= self.max_age_s
        )

    def take(self) -> list[PendingEvent]:
        """The oldest events, up to one batch, removed from the queue (empty when none)."""
        batch = self._items[:MAX_EVENT_BATCH]
        del self._items[:MAX_EVENT_BATCH]
        return batch

    def requeue(self, batch: Sequence[PendingEvent]) -> None:
        """Put a batch that was not delivered back in front, in its order and with its age."""
        self._items[:0] = batch
        self._trim()

    def failed(self, batch: Sequence[PendingEvent], err: AgentError) -> bool:
        """Settle a batch whose POST failed: requeue it (True) or drop it if refused as bad."""
        if isinstance(err, ServerRequestError) and err.status in REJECTED_STATUSES:
            self.dropped += len(batch)
            return False
        self.requeue(batch)
        return True

    def _trim(self) -> None:
        excess = len(self._items) - self.capacity
        if excess > 0:
            del self._items[:excess]  # oldest first; MQTT carried them anyway
            self.dropped += excess


def flush(queue: EventQueue, send: Callable[[list[PendingEvent]], object]) -> int:
    """Send every queued batch, oldest first; the number of events sent.

    At the first failure the batch is settled (``EventQueue.failed``) and the error
    re-raised, so later events wait behind it and order is kept.
    """
    sent = 0
    while batch := queue.take():
        try:
            send(batch)
        except AgentError as err:
            queue.failed(batch, err)
            raise
        sent += len(batch)
    return sent

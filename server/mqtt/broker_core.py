"""The embedded broker's state: sessions, subscriptions, retained messages, routing.

Everything here runs on the broker's one event loop and never awaits, so
routing a message and changing subscriptions cannot interleave (amqtt
iterated its subscription dict across awaits and dropped messages with
"dictionary changed size during iteration").

A message is handed to every matching session's queue before the publisher
gets its PUBACK, and stays there (then in the session's in-flight table)
until the subscriber acknowledges it. Sessions of the server's own user are
*guaranteed*: their queues never drop; when one holds ``max_queued``
messages, ``flow`` is cleared and the connections stop taking PUBLISH
packets from devices (which keep them in their outboxes) until it drains.
Device sessions (their ``cmd`` topic) drop the newest message when full.

Access is checked on the way out too: a session receives a message (live or
retained) only if ``may_receive(username, topic)``. Retained messages are
never replayed to the server's own user: its ingest has a persistent session,
and replaying every device's retained state at each start is a storm (the
MQTT 5 "do not send retained" option, applied by the broker).
Shared subscriptions ``$share/<group>/<filter>`` hand each message to one
member of the group, preferring connected members, and replay nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from server.mqtt.broker_codec import Publish

log = logging.getLogger(__name__)

SHARE_PREFIX = "$share/"
MAX_QOS = 1  # QoS 2 subscriptions are granted QoS 1; devices use QoS 1


class Link(Protocol):
    """The connection a session is attached to."""

    def wake(self) -> None: ...
    def supersede(self) -> None: ...


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool = False

    def packet(self, packet_id: int | None, *, dup: bool = False) -> Publish:
        return Publish(self.topic, self.payload, self.qos, self.retain, dup, packet_id)


@dataclass(eq=False)
class Session:
    client_id: str
    username: str | None
    clean: bool
    guaranteed: bool = False
    link: Link | None = None
    subs: dict[str, int] = field(default_factory=dict)  # plain filter -> granted QoS
    shared: dict[tuple[str, str], int] = field(default_factory=dict)  # (group, filter) -> QoS
    queue: deque[Message] = field(default_factory=deque)
    inflight: dict[int, Message] = field(default_factory=dict)  # packet id -> message, in order
    qos2_received: set[int] = field(default_factory=set)  # inbound QoS 2 awaiting PUBREL
    dropped: int = 0
    _next_id: int = 0

    @property
    def backlog(self) -> int:
        return len(self.queue) + len(self.inflight)

    def next_packet_id(self) -> int:
        for _ in range(0xFFFF):
            self._next_id = self._next_id % 0xFFFF + 1
            if self._next_id not in self.inflight:
                return self._next_id
        raise RuntimeError("no free packet identifier")  # in-flight is capped far below this


def valid_filter(topic_filter: str) -> bool:
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def parse_shared(topic_filter: str) -> tuple[str, str] | None:
    """(group, filter) of ``$share/<group>/<filter>``; None for a plain filter.

    Raises ValueError for a malformed shared subscription.
    """
    if not topic_filter.startswith(SHARE_PREFIX):
        return None
    group, _, inner = topic_filter[len(SHARE_PREFIX) :].partition("/")
    if not group or any(c in group for c in "+#") or not valid_filter(inner):
        raise ValueError(f"malformed shared subscription {topic_filter[:200]!r}")
    return group, inner


def matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (MQTT 4.7; ``$`` topics escape wildcards)."""
    if "+" not in topic_filter and "#" not in topic_filter:
        return topic_filter == topic
    if topic.startswith("$") and topic_filter[0] in "+#":
        return False
    f_levels, t_levels = topic_filter.split("/"), topic.split("/")
    for index, level in enumerate(f_levels):
        if level == "#":
            return True
        if index >= len(t_levels) or level not in ("+", t_levels[index]):
            return False
    return len(f_levels) == len(t_levels)


@dataclass(eq=False)
class _Group:
    members: dict[str, int] = field(default_factory=dict)  # client id -> QoS
    turn: int = 0


class Core:
    """Sessions and routing; ``may_receive`` is the read ACL applied to every delivery."""

    def __init__(self, may_receive: Callable[[str | None, str], bool], max_queued: int) -> None:
        self.sessions: dict[str, Session] = {}
        self.retained: dict[str, Message] = {}
        self.flow = asyncio.Event()  # cleared while a guaranteed session is full
        self.flow.set()
        self._may_receive = may_receive
        self._max_queued = max_queued
        self._exact: dict[str, dict[str, int]] = {}  # topic -> {client id: QoS}
        self._wild: dict[str, dict[str, int]] = {}  # wildcard filter -> {client id: QoS}
        self._groups: dict[tuple[str, str], _Group] = {}
        self._full: set[str] = set()  # guaranteed sessions at their limit

    # -- sessions -------------------------------------------------------------------------
    def remove_session(self, session: Session) -> None:
        for topic_filter in list(session.subs):
            self.unsubscribe(session, topic_filter)
        for group, topic_filter in list(session.shared):
            self.unsubscribe(session, f"{SHARE_PREFIX}{group}/{topic_filter}")
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        session.queue.clear()
        session.inflight.clear()
        self.update_flow(session)

    def update_flow(self, session: Session) -> None:
        """Re-check back-pressure after ``session``'s backlog changed."""
        if not session.guaranteed:
            return
        alive = self.sessions.get(session.client_id) is session
        if alive and session.backlog >= self._max_queued:
            if session.client_id not in self._full:
                log.warning(
                    "MQTT session %s holds %d messages; pausing device publishes",
                    session.client_id,
                    session.backlog,
                )
            self._full.add(session.client_id)
            self.flow.clear()
        elif session.client_id in self._full:
            self._full.discard(session.client_id)
            if not self._full:
                self.flow.set()

    # -- subscriptions --------------------------------------------------------------------
    def subscribe(self, session: Session, topic_filter: str, qos: int) -> int:
        """Record a subscription; returns the granted QoS. The caller checked the ACL."""
        granted = min(qos, MAX_QOS)
        shared = parse_shared(topic_filter)
        if shared is not None:
            session.shared[shared] = granted
            self._groups.setdefault(shared, _Group()).members[session.client_id] = granted
            return granted
        session.subs[topic_filter] = granted
        index = self._wild if "+" in topic_filter or "#" in topic_filter else self._exact
        index.setdefault(topic_filter, {})[session.client_id] = granted
        return granted

    def unsubscribe(self, session: Session, topic_filter: str) -> None:
        try:
            shared = parse_shared(topic_filter)
        except ValueError:
            return
        if shared is not None:
            session.shared.pop(shared, None)
            group = self._groups.get(shared)
            if group is not None:
                group.members.pop(session.client_id, None)
                if not group.members:
                    del self._groups[shared]
            return
        if session.subs.pop(topic_filter, None) is None:
            return
        index = self._wild if "+" in topic_filter or "#" in topic_filter else self._exact
        members = index.get(topic_filter)
        if members is not None:
            members.pop(session.client_id, None)
            if not members:
                del index[topic_filter]

    def retained_for(self, session: Session, topic_filter: str, qos: int) -> Iterator[Message]:
        """Retained messages a new plain subscription gets, read ACL applied."""
        if session.guaranteed or parse_shared(topic_filter) is not None:
            return
        if "+" in topic_filter or "#" in topic_filter:
            found = [m for t, m in self.retained.items() if matches(topic_filter, t)]
        else:
            message = self.retained.get(topic_filter)
            found = [message] if message is not None else []
        for message in found:
            if self._may_receive(session.username, message.topic):
                yield Message(message.topic, message.payload, min(message.qos, qos), retain=True)

    # -- routing --------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Store (if retained) and queue ``payload`` for every session that may read it."""
        qos = min(qos, MAX_QOS)
        if retain:
            if payload:
                self.retained[topic] = Message(topic, payload, qos, retain=True)
            else:
                self.retained.pop(topic, None)
        targets: dict[str, int] = dict(self._exact.get(topic, {}))
        for topic_filter, members in self._wild.items():
            if matches(topic_filter, topic):
                for client_id, granted in members.items():
                    targets[client_id] = max(granted, targets.get(client_id, 0))
        for (_group, topic_filter), group in self._groups.items():
            if matches(topic_filter, topic):
                chosen = self._pick(group)
                if chosen is not None:
                    targets[chosen] = max(group.members[chosen], targets.get(chosen, 0))
        for client_id, granted in targets.items():
            session = self.sessions.get(client_id)
            if session is not None:
                self._deliver(session, Message(topic, payload, min(qos, granted)))

    def _pick(self, group: _Group) -> str | None:
        """The next group member in turn, connected ones first."""
        members = list(group.members)
        if not members:
            return None
        order = members[group.turn % len(members) :] + members[: group.turn % len(members)]
        group.turn += 1
        live = [c for c in order if (s := self.sessions.get(c)) is not None and s.link is not None]
        if live:
            return live[0]
        kept = [c for c in order if (s := self.sessions.get(c)) is not None and not s.clean]
        return kept[0] if kept else None

    def _deliver(self, session: Session, message: Message) -> None:
        if not self._may_receive(session.username, message.topic):
            return
        if session.link is None and (session.clean or message.qos == 0):
            return
        if not session.guaranteed and session.backlog >= self._max_queued:
            session.dropped += 1
            if session.dropped in (1, 10, 100) or session.dropped % 1000 == 0:
                log.warning(
                    "MQTT session %s is full; %d messages dropped",
                    session.client_id,
                    session.dropped,
                )
            return
        session.queue.append(message)
        self.update_flow(session)
        if session.link is not None:
            session.link.wake()

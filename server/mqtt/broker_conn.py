"""One client connection of the embedded broker: handshake, reading, sending, will.

The promises kept here:

- A CONNECT is refused (CONNACK 5) when the login fails or when its Last
  Will names a topic the user may not publish: a device's will can only be
  its own state, events, telemetry or results.
- No packet over ``max_packet_bytes`` is read: the connection is dropped as
  soon as the length field says so (and its will, if any, fires).
- Keep-alive: a client silent for 1.5x its keep-alive is dropped and its
  will published.
- A PUBLISH is acknowledged only once it sits in every subscriber's session;
  an outgoing QoS 1 message stays in flight until the subscriber's PUBACK,
  and a persistent session gets it again (DUP) when it reconnects. Nothing is
  given up on a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass
from typing import Protocol

from server.mqtt import broker_codec as codec
from server.mqtt.broker_core import Core, Message, Session, parse_shared, valid_filter

log = logging.getLogger(__name__)

KEEPALIVE_FACTOR = 1.5  # MQTT 3.1.2.10: disconnect after one and a half keep-alive periods
_WRITE_HIGH_WATER = 256 * 1024  # wait for the socket once this much is buffered


@dataclass(frozen=True)
class BrokerLimits:
    """Limits of the embedded broker (see ``ServerConfig``)."""

    max_packet_bytes: int = 256 * 1024
    max_queued_messages: int = 10_000
    max_inflight_messages: int = 64
    connect_timeout_s: float = 10.0


class Gate(Protocol):
    """Logins and topic rules (``server.mqtt.broker.MqttAuthorizer``)."""

    def login(self, username: str | None, password: str | None) -> bool: ...
    def is_internal(self, username: str | None) -> bool: ...
    def may_publish(self, username: str | None, topic: str) -> bool: ...
    def may_subscribe(self, username: str | None, topic_filter: str) -> bool: ...


class Connection:
    """Serves one client from CONNECT to close; ``serve`` never raises."""

    def __init__(
        self,
        core: Core,
        gate: Gate,
        limits: BrokerLimits,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        internal_only: bool = False,
    ) -> None:
        self.core = core
        self.gate = gate
        self.limits = limits
        self.reader = reader
        self.writer = writer
        self.internal_only = internal_only  # the loopback listener of TLS mode: server only
        self.session: Session | None = None
        self.username: str | None = None
        self.internal = False
        self.quiet = False  # broker stopping: publish no will, take no more messages
        self._will: codec.Will | None = None
        self._keepalive = 0
        self._wake = asyncio.Event()
        self._superseded = False
        self._sender: asyncio.Task[None] | None = None
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    # -- the Link protocol (called by the core and the broker) ------------------------
    def wake(self) -> None:
        self._wake.set()

    def supersede(self) -> None:
        """A newer connection took this session over: stop at once, leave the session be."""
        self._superseded = True
        self._stop_sending()
        self.writer.transport.abort()

    def halt(self) -> None:
        """The broker is stopping: take no more messages from this client."""
        self.quiet = True
        with contextlib.suppress(AttributeError, RuntimeError):
            self.writer.transport.pause_reading()  # type: ignore[attr-defined]

    def abort(self) -> None:
        self.quiet = True
        self._stop_sending()
        self.writer.transport.abort()

    # -- lifecycle ------------------------------------------------------------------------
    async def serve(self) -> None:
        clean = False
        try:
            if await self._handshake():
                self._sender = asyncio.create_task(self._send_loop())
                clean = await self._read_loop()
            else:
                clean = True  # refused or gone before CONNECT: close after the CONNACK
        except codec.PacketTooLargeError as err:
            log.warning("MQTT client %s (%s) dropped: %s", self.username, self.peer, err)
        except asyncio.TimeoutError:
            log.info("MQTT client %s (%s) silent past its keep-alive", self.username, self.peer)
        except codec.PacketError as err:
            log.warning("MQTT client %s (%s) broke the protocol: %s", self.username, self.peer, err)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as err:
            log.debug("MQTT client %s (%s) connection lost: %r", self.username, self.peer, err)
        except Exception:
            log.exception("MQTT connection %s (%s) failed", self.username, self.peer)
        finally:
            self._stop_sending()
            self._finish(clean)

    def _stop_sending(self) -> None:
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()

    def _finish(self, clean: bool) -> None:
        """Detach from the session (will, clean-session removal) and close: gracefully after
        a DISCONNECT or a refusal, at once (unread data dropped) after anything else."""
        session = self.session
        if session is not None and not self._superseded and session.link is self:
            session.link = None
            if not clean and not self.quiet and self._will is not None:
                will = self._will
                log.info("publishing the will of %s on %s", self.username, will.topic[:200])
                self.core.publish(will.topic, will.payload, will.qos, will.retain)
            if session.clean:
                self.core.remove_session(session)
        if clean:
            self.writer.close()
        else:
            self.writer.transport.abort()

    def _send(self, packet: codec.Packet) -> None:
        self.writer.write(codec.encode(packet))

    # -- CONNECT --------------------------------------------------------------------------
    async def _handshake(self) -> bool:
        try:
            frame = await asyncio.wait_for(
                codec.read_packet(self.reader, self.limits.max_packet_bytes),
                self.limits.connect_timeout_s,
            )
        except asyncio.TimeoutError:
            log.info("MQTT client %s sent no CONNECT in time", self.peer)
            return False
        if frame is None:
            return False
        kind, flags, body = frame
        if kind != codec.CONNECT:
            raise codec.PacketError("the first packet is not CONNECT")
        try:
            connect = codec.decode(kind, flags, body)
        except codec.UnsupportedProtocolError as err:
            log.info("MQTT client %s refused: %s", self.peer, err)
            self._send(codec.Connack(False, codec.REFUSED_PROTOCOL))
            await self.writer.drain()
            return False
        assert isinstance(connect, codec.Connect)
        self.username = connect.username
        code = await self._authorize(connect)
        if code == codec.ACCEPTED and not connect.client_id and not connect.clean:
            code = codec.REFUSED_IDENTIFIER  # [MQTT-3.1.3-8]
        if code != codec.ACCEPTED:
            self._send(codec.Connack(False, code))
            await self.writer.drain()
            return False
        self.internal = self.gate.is_internal(connect.username)
        client_id = connect.client_id or f"auto-{secrets.token_hex(8)}"
        present = self._attach(client_id, connect)
        self._will, self._keepalive = connect.will, connect.keepalive
        self._send(codec.Connack(present, codec.ACCEPTED))
        self._wake.set()  # send what the session holds
        return True

    async def _authorize(self, connect: codec.Connect) -> int:
        username = connect.username
        if self.internal_only and not self.gate.is_internal(username):
            return codec.REFUSED_NOT_AUTHORIZED
        try:
            password = None if connect.password is None else connect.password.decode("utf-8")
        except UnicodeDecodeError:
            return codec.REFUSED_BAD_LOGIN
        # The check may read the database: keep it off the event loop.
        if not await asyncio.to_thread(self.gate.login, username, password):
            log.info("MQTT login refused for username %r", username)
            return codec.REFUSED_NOT_AUTHORIZED
        will = connect.will
        if will is not None and (
            not _valid_topic(will.topic) or not self.gate.may_publish(username, will.topic)
        ):
            log.warning("MQTT CONNECT of %r refused: will on %r", username, will.topic[:200])
            return codec.REFUSED_NOT_AUTHORIZED
        return codec.ACCEPTED

    def _attach(self, client_id: str, connect: codec.Connect) -> bool:
        """Bind this connection to its session (no await: atomic); True if one was resumed."""
        existing = self.core.sessions.get(client_id)
        if existing is not None:
            if existing.link is not None:
                log.info("MQTT client id %s taken over by a new connection", client_id)
                existing.link.supersede()
                existing.link = None
            if connect.clean or existing.username != connect.username:
                # Never hand one user's queued messages to another.
                self.core.remove_session(existing)
                existing = None
        if existing is None:
            session = Session(client_id, connect.username, connect.clean, guaranteed=self.internal)
            self.core.sessions[client_id] = session
        else:
            session = existing
        session.link = self
        self.session = session
        return existing is not None

    # -- reading --------------------------------------------------------------------------
    async def _read_loop(self) -> bool:
        """Handle packets until the client leaves; True if it sent DISCONNECT."""
        timeout = self._keepalive * KEEPALIVE_FACTOR if self._keepalive else None
        while True:
            frame = await asyncio.wait_for(
                codec.read_packet(self.reader, self.limits.max_packet_bytes), timeout
            )
            if frame is None:
                return False
            packet = codec.decode(*frame)
            if isinstance(packet, codec.Publish):
                await self._on_publish(packet)
            elif isinstance(packet, codec.Ack):
                self._on_ack(packet)
            elif isinstance(packet, codec.Subscribe):
                self._on_subscribe(packet)
            elif isinstance(packet, codec.Unsubscribe):
                assert self.session is not None
                for topic_filter in packet.filters:
                    self.core.unsubscribe(self.session, topic_filter)
                self._send(codec.Unsuback(packet.packet_id))
            elif isinstance(packet, codec.Control) and packet.kind == codec.PINGREQ:
                self._send(codec.Control(codec.PINGRESP))
            elif isinstance(packet, codec.Control) and packet.kind == codec.DISCONNECT:
                return True
            else:
                raise codec.PacketError(f"unexpected {type(packet).__name__} packet")

    async def _on_publish(self, packet: codec.Publish) -> None:
        session = self.session
        assert session is not None
        if not _valid_topic(packet.topic):
            raise codec.PacketError(f"PUBLISH to an invalid topic {packet.topic[:200]!r}")
        if not self.internal and not self.core.flow.is_set():
            await self.core.flow.wait()  # the ingest is behind: the device keeps it for now
        if self.quiet:
            return  # not acknowledged: the device sends it again to the next broker
        if packet.qos == 2 and packet.packet_id in session.qos2_received:
            self._send(codec.Ack(codec.PUBREC, packet.packet_id))
            return
        if self.gate.may_publish(self.username, packet.topic):
            self.core.publish(packet.topic, packet.payload, packet.qos, packet.retain)
        else:
            log.warning("MQTT publish denied: %r on %r", self.username, packet.topic[:200])
        if packet.packet_id is None:
            return
        if packet.qos == 1:
            self._send(codec.Ack(codec.PUBACK, packet.packet_id))
        else:
            session.qos2_received.add(packet.packet_id)
            self._send(codec.Ack(codec.PUBREC, packet.packet_id))

    def _on_ack(self, packet: codec.Ack) -> None:
        session = self.session
        assert session is not None
        if packet.kind == codec.PUBACK:
            if session.inflight.pop(packet.packet_id, None) is not None:
                self.core.update_flow(session)
                self._wake.set()
        elif packet.kind == codec.PUBREL:
            session.qos2_received.discard(packet.packet_id)
            self._send(codec.Ack(codec.PUBCOMP, packet.packet_id))
        # PUBREC and PUBCOMP: this broker never sends QoS 2, so there is nothing to do.

    def _on_subscribe(self, packet: codec.Subscribe) -> None:
        session = self.session
        assert session is not None
        codes: list[int] = []
        replay: list[Message] = []
        for topic_filter, qos in packet.filters:
            if not _valid_subscription(topic_filter) or not self.gate.may_subscribe(
                self.username, topic_filter
            ):
                log.warning("MQTT subscribe denied: %r on %r", self.username, topic_filter[:200])
                codes.append(codec.SUBACK_FAILURE)
                continue
            granted = self.core.subscribe(session, topic_filter, qos)
            codes.append(granted)
            replay.extend(self.core.retained_for(session, topic_filter, granted))
        self._send(codec.Suback(packet.packet_id, tuple(codes)))
        if replay:
            session.queue.extend(replay)
            self._wake.set()

    # -- sending --------------------------------------------------------------------------
    async def _send_loop(self) -> None:
        session = self.session
        assert session is not None
        for resend_id, resend in list(session.inflight.items()):
            self.writer.write(codec.encode_publish(resend.packet(resend_id, dup=True)))
        transport = self.writer.transport
        while True:
            await self._wake.wait()
            self._wake.clear()
            while (
                session.link is self
                and session.queue
                and len(session.inflight) < self.limits.max_inflight_messages
            ):
                message = session.queue.popleft()
                packet_id: int | None = None
                if message.qos:
                    packet_id = session.next_packet_id()
                    session.inflight[packet_id] = message
                self.writer.write(codec.encode_publish(message.packet(packet_id)))
                if transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
                    await self.writer.drain()
            self.core.update_flow(session)
            await self.writer.drain()


def _valid_topic(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic


def _valid_subscription(topic_filter: str) -> bool:
    try:
        return parse_shared(topic_filter) is not None or valid_filter(topic_filter)
    except ValueError:
        return False

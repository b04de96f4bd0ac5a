"""MQTT 3.1.1 (and 3.1) packets for the embedded broker: strict decoding, plain encoding.

``read_packet`` frames one packet from a stream and refuses, before reading
its body, any packet whose total size (fixed header included, as Mosquitto's
``max_packet_size`` counts it) exceeds the limit, so an oversized PUBLISH is
never buffered. ``decode`` turns a frame into a dataclass and raises
``PacketError`` on anything the specification forbids (bad flags, invalid
UTF-8 or U+0000 in a string, a missing packet id, trailing bytes); the
broker then drops the connection. The encoders cover every packet either
side sends, so the codec round-trips in tests.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

# CONNACK return codes (3.2.2.3)
ACCEPTED = 0
REFUSED_PROTOCOL = 1
REFUSED_IDENTIFIER = 2
REFUSED_UNAVAILABLE = 3
REFUSED_BAD_LOGIN = 4
REFUSED_NOT_AUTHORIZED = 5
SUBACK_FAILURE = 0x80

_PROTOCOLS = {("MQTT", 4), ("MQIsdp", 3)}  # 3.1.1 and 3.1
_MAX_REMAINING = 268_435_455  # four length bytes
_ACK_TYPES = (PUBACK, PUBREC, PUBREL, PUBCOMP)


class PacketError(Exception):
    """The peer broke the protocol; the connection must be closed."""


class PacketTooLargeError(PacketError):
    """A packet over the size limit; its body was not read."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"packet of {size} bytes exceeds the limit of {limit}")
        self.size = size


class UnsupportedProtocolError(PacketError):
    """A CONNECT for a protocol other than MQTT 3.1.1 or 3.1 (answered with CONNACK 1)."""


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class Connect:
    client_id: str
    clean: bool
    keepalive: int
    will: Will | None = None
    username: str | None = None
    password: bytes | None = None
    protocol: tuple[str, int] = ("MQTT", 4)


@dataclass(frozen=True)
class Connack:
    session_present: bool
    code: int


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None


@dataclass(frozen=True)
class Ack:
    """PUBACK, PUBREC, PUBREL or PUBCOMP."""

    kind: int
    packet_id: int


@dataclass(frozen=True)
class Subscribe:
    packet_id: int
    filters: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Suback:
    packet_id: int
    codes: tuple[int, ...]


@dataclass(frozen=True)
class Unsubscribe:
    packet_id: int
    filters: tuple[str, ...]


@dataclass(frozen=True)
class Unsuback:
    packet_id: int


@dataclass(frozen=True)
class Control:
    """PINGREQ, PINGRESP or DISCONNECT."""

    kind: int


Packet = Connect | Connack | Publish | Ack | Subscribe | Suback | Unsubscribe | Unsuback | Control


# -- framing -----------------------------------------------------------------------------
async def read_packet(
    reader: asyncio.StreamReader, max_bytes: int
) -> tuple[int, int, bytes] | None:
    """(type, flags, body) of the next packet; None on end of stream before a packet starts.

    Raises ``PacketTooLargeError`` as soon as the length field shows the packet is
    over ``max_bytes``, and ``asyncio.IncompleteReadError`` on a truncated one.
    """
    first = await reader.read(1)
    if not first:
        return None
    remaining, multiplier, length_bytes = 0, 1, 0
    while True:
        (byte,) = await reader.readexactly(1)
        length_bytes += 1
        remaining += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            break
        if length_bytes == 4:
            raise PacketError("malformed remaining length")
        multiplier *= 128
    size = 1 + length_bytes + remaining
    if size > max_bytes:
        raise PacketTooLargeError(size, max_bytes)
    body = await reader.readexactly(remaining) if remaining else b""
    return first[0] >> 4, first[0] & 0x0F, body


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise PacketError("packet ends early")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack("!H", self.take(2))[0]
        return value

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        raw = self.binary()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise PacketError("string is not valid UTF-8") from err
        if "\x00" in text:
            raise PacketError("string contains U+0000")
        return text

    def packet_id(self) -> int:
        value = self.u16()
        if value == 0:
            raise PacketError("packet identifier 0")
        return value

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def end(self) -> None:
        if self.left:
            raise PacketError(f"{self.left} unexpected bytes at the end of the packet")


# -- decoding (what a client sends a broker, and PUBLISH both ways) ------------------------
def decode(kind: int, flags: int, body: bytes) -> Packet:
    cur = _Cursor(body)
    if kind == PUBLISH:
        return _decode_publish(flags, cur)
    expected_flags = 0b0010 if kind in (PUBREL, SUBSCRIBE, UNSUBSCRIBE) else 0
    if flags != expected_flags:
        raise PacketError(f"packet type {kind} with reserved flags {flags:#x}")
    packet: Packet
    if kind == CONNECT:
        packet = _decode_connect(cur)
    elif kind in _ACK_TYPES:
        packet = Ack(kind, cur.packet_id())
    elif kind == SUBSCRIBE:
        packet = _decode_subscribe(cur)
    elif kind == UNSUBSCRIBE:
        packet_id, filters = cur.packet_id(), []
        while cur.left:
            filters.append(cur.string())
        if not filters:
            raise PacketError("UNSUBSCRIBE without a topic filter")
        packet = Unsubscribe(packet_id, tuple(filters))
    elif kind in (PINGREQ, DISCONNECT):
        packet = Control(kind)
    else:
        raise PacketError(f"a client may not send packet type {kind}")
    cur.end()
    return packet


def _decode_publish(flags: int, cur: _Cursor) -> Publish:
    qos, dup, retain = (flags >> 1) & 0x03, bool(flags & 0x08), bool(flags & 0x01)
    if qos == 3:
        raise PacketError("PUBLISH with QoS 3")
    if dup and qos == 0:
        raise PacketError("PUBLISH with DUP set at QoS 0")
    topic = cur.string()
    packet_id = cur.packet_id() if qos else None
    return Publish(topic, cur.take(cur.left), qos, retain, dup, packet_id)


def _decode_connect(cur: _Cursor) -> Connect:
    protocol = (cur.string(), cur.u8())
    if protocol not in _PROTOCOLS:
        raise UnsupportedProtocolError(
            f"unsupported protocol {protocol[0][:16]!r} level {protocol[1]}"
        )
    flags, keepalive = cur.u8(), cur.u16()
    if flags & 0x01:
        raise PacketError("CONNECT reserved flag set")
    will_flag, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 0x03, bool(flags & 0x20)
    has_user, has_password = bool(flags & 0x80), bool(flags & 0x40)
    if will_qos == 3 or (not will_flag and (will_qos or will_retain)):
        raise PacketError("CONNECT will flags are inconsistent")
    if has_password and not has_user:
        raise PacketError("CONNECT password without a user name")
    client_id = cur.string()
    will = Will(cur.string(), cur.binary(), will_qos, will_retain) if will_flag else None
    username = cur.string() if has_user else None
    password = cur.binary() if has_password else None
    return Connect(client_id, bool(flags & 0x02), keepalive, will, username, password, protocol)


def _decode_subscribe(cur: _Cursor) -> Subscribe:
    packet_id, filters = cur.packet_id(), []
    while cur.left:
        topic_filter, options = cur.string(), cur.u8()
        if options & 0xFC or options == 3:
            raise PacketError("SUBSCRIBE with an invalid requested QoS")
        filters.append((topic_filter, options))
    if not filters:
        raise PacketError("SUBSCRIBE without a topic filter")
    return Subscribe(packet_id, tuple(filters))


# -- encoding --------------------------------------------------------------------------------
def _frame(first: int, body: bytes) -> bytes:
    n = len(body)
    if n > _MAX_REMAINING:
        raise ValueError("packet too large for MQTT")
    length = bytearray()
    while True:
        byte, n = n % 128, n // 128
        length.append(byte | (0x80 if n else 0))
        if not n:
            return bytes([first]) + bytes(length) + body


def _string(text: str) -> bytes:
    return _binary(text.encode("utf-8"))


def _binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("field longer than 65535 bytes")
    return struct.pack("!H", len(data)) + data


def encode_publish(message: Publish) -> bytes:
    flags = (message.qos << 1) | (0x08 if message.dup else 0) | (0x01 if message.retain else 0)
    body = _string(message.topic)
    if message.qos:
        assert message.packet_id is not None
        body += struct.pack("!H", message.packet_id)
    return _frame((PUBLISH << 4) | flags, body + message.payload)


def _encode_ack(packet: Ack) -> bytes:
    first = (packet.kind << 4) | (0b0010 if packet.kind == PUBREL else 0)
    return _frame(first, struct.pack("!H", packet.packet_id))


def _encode_subscribe(packet: Subscribe) -> bytes:
    body = b"".join(_string(f) + bytes([q]) for f, q in packet.filters)
    return _frame((SUBSCRIBE << 4) | 0b0010, struct.pack("!H", packet.packet_id) + body)


def _encode_unsubscribe(packet: Unsubscribe) -> bytes:
    body = b"".join(_string(f) for f in packet.filters)
    return _frame((UNSUBSCRIBE << 4) | 0b0010, struct.pack("!H", packet.packet_id) + body)


def _encode_connack(packet: Connack) -> bytes:
    return _frame(CONNACK << 4, bytes([int(packet.session_present), packet.code]))


def _encode_suback(packet: Suback) -> bytes:
    return _frame(SUBACK << 4, struct.pack("!H", packet.packet_id) + bytes(packet.codes))


def _encode_unsuback(packet: Unsuback) -> bytes:
    return _frame(UNSUBACK << 4, struct.pack("!H", packet.packet_id))


def _encode_control(packet: Control) -> bytes:
    return _frame(packet.kind << 4, b"")


def encode(packet: Packet) -> bytes:
    encoder: Callable[[Any], bytes] = _ENCODERS[type(packet)]
    return encoder(packet)


def _encode_connect(packet: Connect) -> bytes:
    will = packet.will
    flags = (0x02 if packet.clean else 0) | (0x80 if packet.username is not None else 0)
    flags |= 0x40 if packet.password is not None else 0
    payload = _string(packet.client_id)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += _string(will.topic) + _binary(will.payload)
    if packet.username is not None:
        payload += _string(packet.username)
    if packet.password is not None:
        payload += _binary(packet.password)
    name, level = packet.protocol
    header = _string(name) + bytes([level, flags]) + struct.pack("!H", packet.keepalive)
    return _frame(CONNECT << 4, header + payload)


_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    Connect: _encode_connect,
    Connack: _encode_connack,
    Publish: encode_publish,
    Ack: _encode_ack,
    Subscribe: _encode_subscribe,
    Suback: _encode_suback,
    Unsubscribe: _encode_unsubscribe,
    Unsuback: _encode_unsuback,
    Control: _encode_control,
}

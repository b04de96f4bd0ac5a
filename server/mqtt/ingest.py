"""Telemetry subscriber: stores each device's latest MQTT payload per channel.

A paho-mqtt 2 client with a fixed client id and a persistent session
(clean_session False; with MQTT 5, clean start off and a session that never
expires) subscribes to ``edgefleet/v1/devices/+/+`` at QoS 1. On an external
broker it speaks MQTT 5 and subscribes with "do not send retained messages":
every device leaves a retained ``state``, and a fresh ingest would otherwise
start with a storm of the whole fleet's. The embedded broker (MQTT 3.1.1)
never replays retained messages to the server's own user. With a
``share_group`` the subscription is ``$share/<group>/edgefleet/v1/devices/+/+``,
so several ingest processes (each its own client id) split the stream; the
broker hands each message to one of them.
Without a ``sink``, paho acknowledges a QoS 1 message only after
``on_message`` has stored it. With a ``sink`` (``server.telemetry.writer.RollupWriter``,
the server's default) messages are queued for batched writes, which also drop
QoS 1 repeats by (device, seq); paho acknowledges on queueing, so a server
crash can lose what is queued (under ``flush_interval_s``). With
``manual_ack`` (an external, persistent broker configured never to drop
queued messages) the PUBACK waits for the batch's commit instead. Not for the
embedded broker: it lives and dies with this process anyway.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.common.errors import ProtocolError
from agent.protocol import topics
from server.config import MqttEndpoint
from server.db.queries import store_telemetry
from server.db.tables import Database, utcnow
from server.errors import ServerError
from server.telemetry.accuracy_ingest import ResultsRecorder
from server.telemetry.writer import IngestClosedError, IngestMessage, RollupWriter

log = logging.getLogger(__name__)

_STORED_CHANNELS = ("telemetry", "events", "state", "results")
# One filter per stored channel, not +/+: the commands the server itself publishes on
# every device's cmd topic (up to the push rate) would otherwise come back to it.
SUBSCRIPTIONS = tuple(f"{topics.PREFIX}/+/{channel}" for channel in _STORED_CHANNELS)
_MAX_STATUS_CHARS = 64
_SESSION_NEVER_EXPIRES = 0xFFFFFFFF  # MQTT 5 Session Expiry Interval
MQTT_VERSIONS = {"3.1.1": MQTTProtocolVersion.MQTTv311, "5": MQTTProtocolVersion.MQTTv5}


def subscriptions(share_group: str | None) -> list[str]:
    """The ingest's topic filters, shared across ingest processes when a group is given."""
    return [f"$share/{share_group}/{s}" if share_group else s for s in SUBSCRIPTIONS]


def ingest_protocol(version: str, *, external: bool) -> MQTTProtocolVersion:
    """paho's protocol constant for ``ingest_mqtt_version`` ("auto": 5 only when external)."""
    if version == "auto":
        return MQTTProtocolVersion.MQTTv5 if external else MQTTProtocolVersion.MQTTv311
    try:
        return MQTT_VERSIONS[version]
    except KeyError as err:
        raise IngestError(f"unknown MQTT version {version!r}") from err


class IngestError(ServerError):
    """The telemetry subscriber could not connect or publish."""


@dataclass(frozen=True)
class IngestStats:
    stored: int
    rejected: int
    duplicates: int = 0


def decode_payload(channel: str, payload: bytes, max_bytes: int) -> dict[str, Any]:
    """A JSON object payload, bounded in size; a bare status word is allowed on ``state``."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ProtocolError("payload is not UTF-8") from err
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        # Last wills are often a plain word such as "offline".
        word = text.strip()
        if channel == "state" and 0 < len(word) <= _MAX_STATUS_CHARS and word.isprintable():
            return {"status": word}
        raise ProtocolError("payload is not JSON") from err
    if isinstance(value, str) and channel == "state" and 0 < len(value) <= _MAX_STATUS_CHARS:
        return {"status": value}
    if not isinstance(value, dict):
        raise ProtocolError("payload is not a JSON object")
    return value


def _client(
    endpoint: MqttEndpoint,
    client_id: str,
    *,
    clean_session: bool,
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
) -> paho.Client:
    """The server's paho client for ``endpoint``, with its login and TLS."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        # MQTT 5 has no clean-session flag: clean start and session expiry go in CONNECT.
        clean_session=clean_session if protocol != paho.MQTTv5 else None,
        protocol=protocol,
    )
    if endpoint.username is not None:
        client.username_pw_set(endpoint.username, endpoint.password)
    if endpoint.tls:
        client.tls_set(ca_certs=endpoint.ca_file)
    return client


def discard_session(endpoint: MqttEndpoint, client_id: str, timeout: float = 10.0) -> None:
    """Drop the broker's persistent session for ``client_id`` (a clean-session connect does).

    For tests and decommissioning: a forgotten persistent session keeps
    queueing every device message on an external broker.
    """
    done = threading.Event()
    client = _client(endpoint, client_id, clean_session=True)
    client.on_connect = lambda *_args: done.set()
    try:
        client.connect(endpoint.host, endpoint.port)
    except OSError as err:
        raise IngestError(f"cannot reach MQTT broker {endpoint.host}:{endpoint.port}") from err
    client.loop_start()
    try:
        if not done.wait(timeout):
            raise IngestError("MQTT broker did not answer the clean-session connect")
    finally:
        client.disconnect()
        client.loop_stop()


class TelemetryIngest:
    """Owns the server's MQTT client; also the path for commands to devices."""

    def __init__(
        self,
        db: Database,
        endpoint: MqttEndpoint,
        client_id: str,
        max_payload_bytes: int,
        keepalive_s: int = 30,
        *,
        sink: RollupWriter | None = None,
        on_subscribed: Callable[[], None] | None = None,
        manual_ack: bool = False,
        share_group: str | None = None,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
    ) -> None:
        self._db = db
        self._sink = sink
        self._on_subscribed = on_subscribed
        self._generation = 0  # bumped per connection: an ack never crosses a reconnect
        self._endpoint = endpoint
        self._client_id = client_id
        self._max_payload = max_payload_bytes
        self._keepalive = keepalive_s
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._stored = 0
        self._rejected = 0
        self.results = ResultsRecorder(db)  # field accuracy windows from ``results``
        self.subscriptions = subscriptions(share_group)
        self._protocol = protocol
        client = _client(endpoint, client_id, clean_session=False, protocol=protocol)
        client.manual_ack_set(sink is not None and manual_ack)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client

    @property
    def stats(self) -> IngestStats:
        with self._lock:
            stored, rejected = self._stored, self._rejected
        if self._sink is None:
            return IngestStats(stored, rejected)
        written = self._sink.stats
        return IngestStats(written.stored, rejected + written.rejected, written.duplicates)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def endpoint(self) -> MqttEndpoint:
        return self._endpoint

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def protocol(self) -> MQTTProtocolVersion:
        return self._protocol

    def start(self, timeout: float = 20.0) -> None:
        """Connect and subscribe; keeps reconnecting in the background afterwards."""
        if self._protocol == paho.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = _SESSION_NEVER_EXPIRES
            self._client.connect_async(
                self._endpoint.host,
                self._endpoint.port,
                self._keepalive,
                clean_start=False,
                properties=properties,
            )
        else:
            self._client.connect_async(self._endpoint.host, self._endpoint.port, self._keepalive)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self.stop()
            raise IngestError(
                f"could not connect to MQTT broker {self._endpoint.host}:{self._endpoint.port}"
            )

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
        self.results.close()

    def publish_command(self, device_id: str, payload: dict[str, Any]) -> None:
        """Send a command to one device on its ``cmd`` topic at QoS 1."""
        info = self._client.publish(
            topics.topic(device_id, "cmd"), json.dumps(payload), qos=topics.QOS
        )
        if info.rc != paho.MQTT_ERR_SUCCESS:
            reason = paho.error_string(info.rc)
            raise IngestError(f"publishing a command to {device_id} failed: {reason}")

    def _on_connect(
        self, client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            log.error("MQTT broker refused the ingest client: %s", reason)
            return
        # Subscribe on every connect: an embedded broker restart loses sessions.
        with self._lock:
            self._generation += 1
        if self._protocol == paho.MQTTv5:
            options = SubscribeOptions(
                qos=topics.QOS, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND
            )
            client.subscribe([(s, options) for s in self.subscriptions])
        else:
            client.subscribe([(s, topics.QOS) for s in self.subscriptions])

    def _on_subscribe(
        self, _client: paho.Client, _userdata: Any, _mid: int, reasons: Any, _props: Any
    ) -> None:
        if any(r.is_failure for r in reasons):
            log.error("MQTT broker refused the ingest subscription: %s", reasons)
            return
        if self._on_subscribed is not None:
            self._on_subscribed()
        # "Connected" means subscribed: only now is a device's message sure to reach us.
        self._connected.set()
        log.info("ingest subscribed to %s", ", ".join(self.subscriptions))

    def _on_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self._connected.clear()
        log.info("ingest disconnected from MQTT broker: %s", reason)

    def _ack(self, generation: int, mid: int, qos: int) -> None:
        with self._lock:
            current = generation == self._generation
        if current:
            self._client.ack(mid, qos)

    def _queue_message(self, message: paho.MQTTMessage) -> None:
        ack = partial(self._ack, self._generation, message.mid, message.qos)
        try:
            device_id, channel = topics.parse(message.topic)
            if channel not in _STORED_CHANNELS:
                ack()
                return
            payload = decode_payload(channel, bytes(message.payload), self._max_payload)
        except ProtocolError as err:
            with self._lock:
                self._rejected += 1
            log.warning("dropped MQTT message on %r: %s", message.topic[:200], err)
            ack()
            return
        if channel == "results":
            self.results.record(device_id, payload)
        assert self._sink is not None
        try:
            self._sink.submit(IngestMessage(device_id, channel, payload, utcnow(), ack))
        except IngestClosedError:
            log.info("server stopping; %r left to the broker's redelivery", message.topic[:200])

    def _on_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        if self._sink is not None:
            self._queue_message(message)
            return
        try:
            device_id, channel = topics.parse(message.topic)
            if channel not in _STORED_CHANNELS:
                return
            payload = decode_payload(channel, bytes(message.payload), self._max_payload)
            with self._db.session() as s:
                known = store_telemetry(s, device_id, channel, payload)
            if not known:
                raise ProtocolError(f"unknown device {device_id!r}")
            if channel == "results":
                self.results.record(device_id, payload)
        except ProtocolError as err:
            with self._lock:
                self._rejected += 1
            log.warning("dropped MQTT message on %r: %s", message.topic[:200], err)
            return
        except Exception:
            # A database error must not kill paho's network thread.
            with self._lock:
                self._rejected += 1
            log.exception("storing MQTT message on %r failed", message.topic[:200])
            return
        with self._lock:
            self._stored += 1

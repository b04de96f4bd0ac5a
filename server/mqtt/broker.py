"""The embedded MQTT broker (MQTT 3.1.1) with per-device logins and topic ACLs.

It runs in-process on its own thread and asyncio loop. Devices log in with
username = device id and the MQTT password issued at enrollment (checked
against its sha256 in the database); the server's own ingest client uses an
internal credential. A device may publish only to its own telemetry, events,
state and results topics (its Last Will included: a CONNECT whose will names
any other topic is refused), may subscribe only to its own ``cmd`` topic, and
receives nothing, live or retained, from outside its own topics.

With a TLS certificate the device listener speaks TLS only, and a second,
plain listener on 127.0.0.1 serves the server's own ingest client (and only
it), so the certificate can name the public host. ``stop`` first stops
reading from devices and lets the broker hand every message it already
acknowledged to the ingest, so a broker restart loses nothing the devices
consider delivered.

The protocol work lives in ``broker_codec`` (packets), ``broker_core``
(sessions, routing, retained messages, ``$share`` groups, back-pressure) and
``broker_conn`` (one connection: keep-alive, packet size limit, will). It
replaced amqtt 0.12.1, whose broker delivered wills and retained messages
past the ACL, had no packet size limit, ignored keep-alive and could drop
acknowledged messages while clients subscribed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hmac
import logging
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from agent.common.errors import ProtocolError
from agent.protocol import topics
from server.config import ServerConfig
from server.errors import ServerError
from server.mqtt.broker_conn import BrokerLimits, Connection
from server.mqtt.broker_core import Core

log = logging.getLogger(__name__)

__all__ = [
    "INTERNAL_USERNAME",
    "Action",
    "BrokerError",
    "BrokerLimits",
    "BrokerTls",
    "EmbeddedBroker",
    "MqttAuthorizer",
    "device_may_publish",
    "device_may_receive",
    "device_may_subscribe",
]

# A colon can never appear in a device id, so no device can claim this name.
INTERNAL_USERNAME = "edgefleet:server"
_INTERNAL_HOST = "127.0.0.1"
_INTERNAL_MAX_CONNECTIONS = 16
_DRAIN_POLL_S = 0.02
_BACKLOG = 1024


@dataclass(frozen=True)
class BrokerTls:
    """PEM certificate chain and private key of the device listener."""

    cert_file: Path
    key_file: Path


class BrokerError(ServerError):
    """The embedded broker could not start or stop."""


class Action(enum.Enum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"


def limits_from_config(cfg: ServerConfig) -> BrokerLimits:
    return BrokerLimits(
        max_packet_bytes=cfg.mqtt_max_packet_bytes,
        max_queued_messages=cfg.broker_max_queued_messages,
        max_inflight_messages=cfg.broker_max_inflight_messages,
    )


def device_may_publish(device_id: str, topic_name: str) -> bool:
    try:
        owner, channel = topics.parse(topic_name)
    except ProtocolError:
        return False
    return owner == device_id and channel != "cmd"


def device_may_subscribe(device_id: str, topic_filter: str) -> bool:
    return topic_filter == topics.topic(device_id, "cmd")


def device_may_receive(device_id: str, topic_name: str) -> bool:
    # Defence in depth: even a session taken over under another client id
    # never gets a message from outside its own device's topics.
    return topic_name.startswith(topics.device_prefix(device_id))


class MqttAuthorizer:
    """Decides logins and topic access; ``check_device`` asks the database."""

    def __init__(self, internal_password: str, check_device: Callable[[str, str], bool]) -> None:
        self._internal_password = internal_password
        self._check_device = check_device
        # Cleared while a (re)started broker waits for the ingest to subscribe: a
        # device let in earlier would publish into a broker with no subscriber.
        self.devices_open = threading.Event()
        self.devices_open.set()

    def login(self, username: str | None, password: str | None) -> bool:
        if not username or password is None:
            return False
        if username == INTERNAL_USERNAME:
            return hmac.compare_digest(password.encode(), self._internal_password.encode())
        try:
            topics.check_device_id(username)
        except ProtocolError:
            return False
        if not self.devices_open.is_set():
            log.info("device %s refused until the server's ingest has subscribed", username)
            return False
        return self._check_device(username, password)

    @staticmethod
    def allowed(username: str | None, topic_name: str, action: Action) -> bool:
        if username == INTERNAL_USERNAME:
            return True
        if not username:
            return False
        if action == Action.PUBLISH:
            return device_may_publish(username, topic_name)
        if action == Action.SUBSCRIBE:
            return device_may_subscribe(username, topic_name)
        return device_may_receive(username, topic_name)

    # The broker's gate (``broker_conn.Gate``) and read ACL.
    @staticmethod
    def is_internal(username: str | None) -> bool:
        return username == INTERNAL_USERNAME

    def may_publish(self, username: str | None, topic_name: str) -> bool:
        return self.allowed(username, topic_name, Action.PUBLISH)

    def may_subscribe(self, username: str | None, topic_filter: str) -> bool:
        return self.allowed(username, topic_filter, Action.SUBSCRIBE)

    def may_receive(self, username: str | None, topic_name: str) -> bool:
        return self.allowed(username, topic_name, Action.RECEIVE)


class _Listener:
    def __init__(self, limit: int, internal_only: bool) -> None:
        self.limit = limit
        self.internal_only = internal_only
        self.count = 0
        self.server: asyncio.Server | None = None


class EmbeddedBroker:
    """The broker on its own thread; ``start`` returns the bound port, ``stop`` shuts it down.

    A restart binds the port chosen by the first start, so clients reconnect
    to the address they were given. Sessions and retained messages live in
    memory and do not survive a stop.
    """

    def __init__(
        self,
        host: str,
        port: int,
        authorizer: MqttAuthorizer,
        max_connections: int = 100_000,
        *,
        tls: BrokerTls | None = None,
        drain_timeout_s: float = 5.0,
        hold_devices_until_ingest: bool = False,
        limits: BrokerLimits | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.internal_port = 0  # the plain loopback listener for the ingest (TLS mode only)
        self.limits = limits or BrokerLimits()
        self._authorizer = authorizer
        self._max_connections = max_connections
        self._drain_timeout_s = drain_timeout_s
        self._hold_devices = hold_devices_until_ingest
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._connections: dict[Connection, asyncio.Task[None]] = {}

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def ingest_address(self) -> tuple[str, int]:
        """Where the server's own client connects (plain TCP)."""
        return (_INTERNAL_HOST, self.internal_port) if self.tls else (self.host, self.port)

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
        return context

    async def _accept(
        self,
        core: Core,
        listener: _Listener,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if listener.count >= listener.limit:
            log.warning("MQTT connection refused: %d connections open", listener.count)
            writer.transport.abort()
            return
        listener.count += 1
        conn = Connection(
            core,
            self._authorizer,
            self.limits,
            reader,
            writer,
            internal_only=listener.internal_only,
        )
        task = asyncio.current_task()
        assert task is not None
        self._connections[conn] = task
        try:
            await conn.serve()
        finally:
            listener.count -= 1
            self._connections.pop(conn, None)

    async def _listen(
        self, core: Core, listener: _Listener, host: str, port: int, tls: bool
    ) -> int:
        listener.server = await asyncio.start_server(
            partial(self._accept, core, listener),
            host,
            port,
            ssl=self._ssl_context() if tls else None,
            reuse_address=True,
            backlog=_BACKLOG,  # a fleet reconnects at once after a restart
        )
        return int(listener.server.sockets[0].getsockname()[1])

    async def _serve(self, started: Future[int]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        core = Core(self._authorizer.may_receive, self.limits.max_queued_messages)
        listeners: list[_Listener] = []
        try:
            devices = _Listener(self._max_connections, internal_only=False)
            listeners.append(devices)
            port = await self._listen(core, devices, self.host, self.port, self.tls is not None)
            if self.tls is not None:
                internal = _Listener(_INTERNAL_MAX_CONNECTIONS, internal_only=True)
                listeners.append(internal)
                self.internal_port = await self._listen(
                    core, internal, _INTERNAL_HOST, self.internal_port, False
                )
        except (OSError, ssl.SSLError, ValueError) as err:
            for listener in listeners:
                if listener.server is not None:
                    listener.server.close()
            started.set_exception(BrokerError(f"embedded MQTT broker failed to start: {err}"))
            return
        started.set_result(port)
        await self._stop_event.wait()
        for listener in listeners:
            assert listener.server is not None
            listener.server.close()
        await self._drain(core)
        for conn in list(self._connections):
            conn.abort()
        tasks = list(self._connections.values())
        if tasks:
            await asyncio.wait(tasks, timeout=self._drain_timeout_s)

    async def _drain(self, core: Core) -> None:
        """Take nothing more from devices; let the ingest acknowledge everything queued for it.

        A device deletes a message from its outbox on PUBACK, and the broker
        sends that PUBACK once the message is in the ingest's session. So
        before closing: stop reading from devices (whatever they send from now
        on is unacknowledged and replayed from their outboxes after the
        restart), then wait until the server's sessions have nothing queued
        or in flight.
        """
        for conn in list(self._connections):
            if not conn.internal:
                conn.halt()
        deadline = time.monotonic() + self._drain_timeout_s

        def pending() -> int:
            return sum(
                s.backlog for s in core.sessions.values() if s.guaranteed and s.link is not None
            )

        while pending() and time.monotonic() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        left = sum(s.backlog for s in core.sessions.values() if s.guaranteed)
        if left:
            log.warning("embedded broker stopped with %d messages not handed to the ingest", left)

    def start(self, timeout: float = 20.0) -> int:
        if self.running:
            return self.port
        if self._hold_devices:
            self._authorizer.devices_open.clear()
        started: Future[int] = Future()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._serve(started)), name="mqtt-broker", daemon=True
        )
        self._thread.start()
        self.port = started.result(timeout=timeout)
        log.info("embedded MQTT broker listening on %s:%s", self.host, self.port)
        return self.port

    def stop(self, timeout: float = 20.0) -> None:
        if not self.running or self._loop is None or self._stop_event is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop may have just ended
            self._loop.call_soon_threadsafe(self._stop_event.set)
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise BrokerError("embedded MQTT broker did not stop in time")
        self._thread = None
        log.info("embedded MQTT broker stopped")

    def ingest_ready(self) -> None:
        """The ingest has subscribed: let devices in (see ``hold_devices_until_ingest``)."""
        if not self._authorizer.devices_open.is_set():
            log.info("ingest subscribed; embedded broker now accepts devices")
        self._authorizer.devices_open.set()

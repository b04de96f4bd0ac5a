"""The embedded MQTT broker (amqtt) with per-device logins and topic ACLs.

It runs in-process on its own thread and asyncio loop. Devices log in with
username = device id and the MQTT password issued at enrollment (checked
against its sha256 in the database); the server's own ingest client uses an
internal credential. A device may publish only to its own telemetry, events,
state and results topics and subscribe only to its own ``cmd`` topic.

With a TLS certificate the device listener speaks TLS only, and a second,
plain listener on 127.0.0.1 serves the server's own ingest client, so the
certificate can name the public host. ``stop`` first disconnects devices
and lets the broker hand every message it already acknowledged to the
ingest, so a broker restart loses nothing the devices consider delivered.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from agent.common.errors import ProtocolError
from agent.protocol import topics
from server.errors import ServerError

log = logging.getLogger(__name__)

# A colon can never appear in a device id, so no device can claim this name.
INTERNAL_USERNAME = "edgefleet:server"
_INTERNAL_HOST = "127.0.0.1"
_DRAIN_POLL_S = 0.02
_DEVICE_LISTENER = "default"
_TLS_LISTENER = "devices-tls"
_QUIET_POLLS = 5  # the broadcast loop may hold one message between its queue and a task


@dataclass(frozen=True)
class BrokerTls:
    """PEM certificate chain and private key of the device listener."""

    cert_file: Path
    key_file: Path


class BrokerError(ServerError):
    """The embedded broker could not start or stop."""


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


class DeviceAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped
    """amqtt auth plugin delegating to an ``MqttAuthorizer`` given in its config."""

    @dataclass
    class Config:
        authorizer: Any = None

    async def authenticate(self, *, session: Session) -> bool:
        authorizer: MqttAuthorizer = self.config.authorizer
        # The check reads the database; keep it off the broker's event loop.
        ok = await asyncio.to_thread(authorizer.login, session.username, session.password)
        if not ok:
            log.info("MQTT login refused for username %r", session.username)
        return ok


class DeviceTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt is untyped
    """amqtt topic plugin enforcing the per-device ACL."""

    @dataclass
    class Config:
        authorizer: Any = None

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        if session is None or topic is None or action is None:
            return False
        ok = MqttAuthorizer.allowed(session.username, topic, action)
        if not ok and action != Action.RECEIVE:
            log.warning("MQTT %s denied: %r on %r", action, session.username, topic)
        return ok


class EmbeddedBroker:
    """amqtt on its own thread; ``start`` returns the bound port, ``stop`` shuts it down.

    A restart binds the port chosen by the first start, so clients reconnect
    to the address they were given.
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
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.internal_port = 0  # the plain loopback listener for the ingest (TLS mode only)
        self._authorizer = authorizer
        self._max_connections = max_connections
        self._drain_timeout_s = drain_timeout_s
        self._hold_devices = hold_devices_until_ingest
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def ingest_address(self) -> tuple[str, int]:
        """Where the server's own client connects (plain TCP)."""
        return (_INTERNAL_HOST, self.internal_port) if self.tls else (self.host, self.port)

    def _config(self) -> dict[str, Any]:
        plugin_cfg = {"authorizer": self._authorizer}
        listener: dict[str, Any] = {
            "type": "tcp",
            "bind": f"{self.host}:{self.port}",
            "max_connections": self._max_connections,
        }
        listeners = {_DEVICE_LISTENER: listener}
        if self.tls is not None:
            # amqtt copies unset options from "default" into the other listeners,
            # so "default" is the plain loopback one and the device one says ssl.
            listener.update(
                ssl=True, certfile=str(self.tls.cert_file), keyfile=str(self.tls.key_file)
            )
            listeners = {
                "default": {
                    "type": "tcp",
                    "bind": f"{_INTERNAL_HOST}:{self.internal_port}",
                    "max_connections": 16,
                },
                _TLS_LISTENER: listener,
            }
        return {
            "listeners": listeners,
            "plugins": {
                f"{__name__}.DeviceAuthPlugin": plugin_cfg,
                f"{__name__}.DeviceTopicPlugin": plugin_cfg,
            },
        }

    async def _serve(self, started: Future[int]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        try:
            broker = Broker(self._config())
            await broker.start()
            if self.tls is not None:
                self.internal_port = _bound_port(broker, "default")
            port = _bound_port(broker, _TLS_LISTENER if self.tls else _DEVICE_LISTENER)
        except Exception as err:
            started.set_exception(BrokerError(f"embedded MQTT broker failed to start: {err}"))
            return
        started.set_result(port)
        await self._stop_event.wait()
        try:
            await asyncio.wait_for(_drain(broker), self._drain_timeout_s)
        except (TimeoutError, AttributeError, KeyError) as err:
            log.warning("embedded broker stopped before draining: %r", err)
        await broker.shutdown()

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


def _bound_port(broker: Broker, listener: str) -> int:
    server = broker._servers[listener].instance  # amqtt exposes no bound-port API
    return int(server.sockets[0].getsockname()[1])


async def _drain(broker: Broker) -> None:
    """Stop reading from devices, then let everything they were acknowledged reach the ingest.

    amqtt keeps nothing across a restart and its shutdown drops queued
    deliveries, while a device deletes a message from its outbox on PUBACK,
    and amqtt sends that PUBACK as soon as the message enters the session's
    delivery queue. So: refuse new connections; pause reading on every
    device connection (no new PUBLISH is taken, so no new PUBACK leaves;
    whatever the device sends meanwhile is unacknowledged and replayed from
    its outbox after the restart); wait until the device sessions' queues,
    the broadcast queue and every delivery to the ingest have stayed empty
    for a few polls; then drop the device connections. amqtt has no public
    API for this, hence the private attributes (guarded by the caller).
    """
    for server in broker._servers.values():
        if server.instance is not None:
            server.instance.close()
    devices = [
        (session, handler)
        for session, handler in list(broker._sessions.values())
        if session.username != INTERNAL_USERNAME
    ]
    for _session, handler in devices:
        _transport(handler, "pause_reading")
    quiet = 0
    while quiet < _QUIET_POLLS:
        busy = (
            any(
                not s.delivered_message_queue.empty()
                for s, _h in devices
                if s.transitions.state == "connected"
            )
            or not broker._broadcast_queue.empty()
            or any(not t.done() for t in broker._tasks_queue)
        )
        quiet = 0 if busy else quiet + 1
        await asyncio.sleep(_DRAIN_POLL_S)
    for _session, handler in devices:
        _transport(handler, "abort")


def _transport(handler: Any, action: str) -> None:
    """Call ``pause_reading`` or ``abort`` on a client's asyncio transport."""
    stream = getattr(getattr(handler, "writer", None), "_writer", None)
    transport = getattr(stream, "transport", None)
    if transport is not None and not transport.is_closing():
        getattr(transport, action)()

"""The embedded MQTT broker (amqtt) with per-device logins and topic ACLs.

It runs in-process on its own thread and asyncio loop. Devices log in with
username = device id and the MQTT password issued at enrollment (checked
against its sha256 in the database); the server's own ingest client uses an
internal credential. A device may publish only to its own telemetry, events,
state and results topics and subscribe only to its own ``cmd`` topic.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from agent.errors import ProtocolError
from agent.protocol import topics
from server.errors import ServerError

log = logging.getLogger(__name__)

# A colon can never appear in a device id, so no device can claim this name.
INTERNAL_USERNAME = "edgefleet:server"


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

    def login(self, username: str | None, password: str | None) -> bool:
        if not username or password is None:
            return False
        if username == INTERNAL_USERNAME:
            return hmac.compare_digest(password.encode(), self._internal_password.encode())
        try:
            topics.check_device_id(username)
        except ProtocolError:
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
        self, host: str, port: int, authorizer: MqttAuthorizer, max_connections: int = 100_000
    ) -> None:
        self.host = host
        self.port = port
        self._authorizer = authorizer
        self._max_connections = max_connections
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _config(self) -> dict[str, Any]:
        plugin_cfg = {"authorizer": self._authorizer}
        return {
            "listeners": {
                "default": {
                    "type": "tcp",
                    "bind": f"{self.host}:{self.port}",
                    "max_connections": self._max_connections,
                }
            },
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
            server = broker._servers["default"].instance  # amqtt exposes no bound-port API
            port = int(server.sockets[0].getsockname()[1])
        except Exception as err:
            started.set_exception(BrokerError(f"embedded MQTT broker failed to start: {err}"))
            return
        started.set_result(port)
        await self._stop_event.wait()
        await broker.shutdown()

    def start(self, timeout: float = 20.0) -> int:
        if self.running:
            return self.port
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

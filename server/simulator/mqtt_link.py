"""Many paho-mqtt clients on one asyncio loop: a connection per simulated device.

paho (the agent's own MQTT library) normally runs a network thread per
client; a thousand threads is not a simulator. paho also supports an
external event loop: it reports its socket through callbacks, and the loop
calls ``loop_read``/``loop_write`` when the socket is ready and ``loop_misc``
(keep-alive, retries) once a second. Here that loop is asyncio, so thousands
of devices each log in with their own credentials and ACL, as real ones do.

Each link behaves like ``agent.transport.mqtt.Publisher``: a retained ``offline`` last
will, ``online`` on connect, QoS 1, a ``seq`` and ``ts`` on every message, the
device's ``cmd`` topic subscribed, and reconnection after a broker restart.
There is no on-disk outbox: a message published while disconnected is lost
and counted (``dropped``), which the simulator reports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import topics
from agent.protocol.api import MqttCredentials

log = logging.getLogger(__name__)

CommandHandler = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class LinkLimits:
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 10.0
    misc_interval_s: float = 1.0  # how often paho's keep-alive and retry work runs
    max_inflight: int = 20  # QoS 1 messages awaiting PUBACK per link


class MqttLink:
    """One device's MQTT session, driven by the running asyncio loop."""

    def __init__(
        self,
        device_id: str,
        creds: MqttCredentials,
        limits: LinkLimits,
        on_command: CommandHandler | None = None,
    ) -> None:
        self.device_id = topics.check_device_id(device_id)
        self.creds = creds
        self.limits = limits
        self.on_command = on_command
        self.seq = 0
        self.sent = 0
        self.dropped = 0
        self.acked = 0
        self._connected = asyncio.Event()
        self._closing = False
        self._frozen = False
        self._loop = asyncio.get_running_loop()
        self._client = self._make_client()
        self._reconnect: asyncio.Task[None] | None = None

    def _make_client(self) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"sim-{self.device_id}", protocol=paho.MQTTv311
        )
        client.username_pw_set(self.creds.username, self.creds.password)
        if self.creds.tls:
            client.tls_set()
        offline = json.dumps({"status": "offline", "device_id": self.device_id})
        client.will_set(topics.topic(self.device_id, "state"), offline, qos=1, retain=True)
        client.max_inflight_messages_set(self.limits.max_inflight)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._done_write
        return client

    # -- socket plumbing: paho tells us its socket, asyncio watches it ----------------
    def _socket_open(self, client: paho.Client, _u: Any, sock: Any) -> None:
        self._loop.add_reader(sock, client.loop_read)

    def _socket_close(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)

    def _want_write(self, client: paho.Client, _u: Any, sock: Any) -> None:
        self._loop.add_writer(sock, client.loop_write)

    def _done_write(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        self._loop.remove_writer(sock)

    def misc(self) -> None:
        """paho's periodic work (keep-alive pings, QoS retries); call about once a second."""
        if not self._frozen and self._client.socket() is not None:
            self._client.loop_misc()

    def freeze(self) -> None:
        """Act hung: send nothing more, not even keep-alives, so the broker times the
        session out and publishes the device's ``offline`` last will."""
        self._frozen = True

    # -- paho callbacks (on the asyncio loop) -------------------------------------------
    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT login refused for %s: %s", self.device_id, reason)
            return
        client.subscribe(topics.topic(self.device_id, "cmd"), qos=1)
        online = json.dumps({"status": "online", "device_id": self.device_id})
        client.publish(topics.topic(self.device_id, "state"), online, qos=1, retain=True)
        self._connected.set()

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._connected.clear()
        if not self._closing and not self._frozen and self._reconnect is None:
            log.info("MQTT link of %s lost (%s); reconnecting", self.device_id, reason)
            self._reconnect = self._loop.create_task(self._reconnect_loop())

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            command = json.loads(msg.payload)
        except ValueError:
            command = None
        if not isinstance(command, dict):
            log.warning("ignored a malformed command for %s", self.device_id)
            return
        if self.on_command is not None:
            self.on_command(command)

    def _on_publish(self, _c: paho.Client, _u: Any, _mid: int, _r: Any, _p: Any) -> None:
        self.acked += 1

    # -- public API ---------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def connect(self) -> bool:
        """Log in; False when the broker is unreachable or refuses within the timeout."""
        try:
            # A blocking TCP connect, but to loopback it takes microseconds.
            self._client.connect(self.creds.host, self.creds.port, self.limits.keepalive_s)
        except OSError as err:  # refused, unreachable, timed out
            log.warning("MQTT connect for %s failed: %s", self.device_id, err)
            return False
        try:
            await asyncio.wait_for(self._connected.wait(), self.limits.connect_timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def _reconnect_loop(self) -> None:
        delay = self.limits.reconnect_min_s
        try:
            while not self._closing and not self.connected:
                await asyncio.sleep(delay)
                try:
                    self._client.reconnect()
                    await asyncio.wait_for(self._connected.wait(), self.limits.connect_timeout_s)
                except (OSError, asyncio.TimeoutError):
                    delay = min(delay * 2, self.limits.reconnect_max_s)
        finally:
            self._reconnect = None

    def publish(self, channel: str, payload: dict[str, Any]) -> bool:
        """Queue one QoS 1 message stamped like the agent's outbox; False if it was dropped."""
        if self._frozen:
            return False
        self.seq += 1
        body = {**payload, "seq": self.seq, "ts": payload.get("ts", time.time())}
        if not self.connected:
            self.dropped += 1
            return False
        info = self._client.publish(
            topics.topic(self.device_id, channel), json.dumps(body), qos=topics.QOS
        )
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    async def close(self) -> None:
        """Disconnect cleanly (the broker then keeps no will for this device)."""
        self._closing = True
        if self._reconnect is not None:
            self._reconnect.cancel()
        if self._client.socket() is not None:
            self._client.disconnect()
        await asyncio.sleep(0)

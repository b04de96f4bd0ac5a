"""MQTT publishing through the on-disk outbox, with in-order replay at QoS 1.

Every message is first written to the outbox (SQLite), then a drain thread
sends rows in sequence order while connected and deletes each row only after
its PUBACK. A broker outage therefore loses nothing; a row whose PUBACK was
lost is sent again, and its ``seq`` lets the server drop the duplicate.
"""

from __future__ import annotations

import json
import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.common.errors import TelemetryError
from agent.protocol import topics
from agent.transport.outbox import Outbox, OutboxMessage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int
    username: str
    password: str
    tls: bool = False
    ca_file: str | None = None
    keepalive_s: int = 30
    batch: int = 50
    puback_timeout_s: float = 10.0


class Publisher:
    def __init__(self, device_id: str, settings: MqttSettings, outbox: Outbox) -> None:
        self.device_id = topics.check_device_id(device_id)
        self.settings = settings
        self.outbox = outbox
        self.commands: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=100)
        # Called (paho's thread) after a command is queued: the daemon wakes at once.
        self.on_command: Callable[[], None] | None = None
        self._connected = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.client = self._make_client()

    def _make_client(self) -> paho.Client:
        s = self.settings
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"agent-{self.device_id}")
        client.username_pw_set(s.username, s.password)
        if s.tls:
            client.tls_set(ca_certs=s.ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        offline = json.dumps({"status": "offline", "device_id": self.device_id})
        client.will_set(topics.topic(self.device_id, "state"), offline, qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    # -- paho callbacks (network thread) ----------------------------------
    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("MQTT connection refused: %s", reason)
            return
        client.subscribe(topics.topic(self.device_id, "cmd"), qos=1)
        online = json.dumps({"status": "online", "device_id": self.device_id})
        client.publish(topics.topic(self.device_id, "state"), online, qos=1, retain=True)
        self._connected.set()
        self._wake.set()
        log.info("MQTT connected to %s:%s", self.settings.host, self.settings.port)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            log.warning("MQTT disconnected: %s", reason)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            command = json.loads(msg.payload)
            if not isinstance(command, dict):
                raise ValueError("command is not an object")
            self.commands.put_nowait(command)
        except (ValueError, queue.Full) as err:
            log.warning("ignored command on %s: %s", msg.topic, err)
            return
        if self.on_command is not None:
            self.on_command()

    # -- public API ----------------------------------------------------------
    def start(self) -> None:
        self.client.connect_async(self.settings.host, self.settings.port, self.settings.keepalive_s)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._drain, name="mqtt-drain", daemon=True)
        self._thread.start()

    def stop(self, flush_timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + flush_timeout_s
        while self._connected.is_set() and self.outbox.bytes_used and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, channel: str, payload: dict[str, Any]) -> None:
        """Queue ``payload`` durably; it is sent when the broker is reachable."""
        if channel == "cmd":
            raise TelemetryError("devices do not publish on their cmd topic")
        body = dict(payload)
        dropped = self.outbox.take_dropped()
        if dropped:
            body["outbox_dropped"] = dropped
        body.setdefault("ts", time.time())
        self.outbox.put(topics.topic(self.device_id, channel), json.dumps(body).encode())
        self._wake.set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- drain thread --------------------------------------------------------
    def _drain(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            while self._connected.is_set() and not self._stop.is_set():
                rows = self.outbox.peek(self.settings.batch)
                if not rows or not self._send(rows):
                    break

    def _send(self, rows: list[OutboxMessage]) -> bool:
        pending = []
        for row in rows:
            seq = row.seq
            body = json.loads(row.payload)
            body["seq"] = seq
            info = self.client.publish(row.topic, json.dumps(body), qos=1)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                return False
            pending.append((seq, info))
        for seq, info in pending:
            try:
                info.wait_for_publish(timeout=self.settings.puback_timeout_s)
            except (RuntimeError, ValueError):
                return False
            if not info.is_published():
                return False
            self.outbox.ack(seq)
            self.sent += 1
        return True

"""Commands for the devices that have no MQTT session of their own: one shared subscription.

A real camera keeps one MQTT session and learns on its ``cmd`` topic that it
should check in. One paho session per simulated device is what ``MqttLink``
does, and it is the right thing for the sample that also publishes telemetry
and tests the broker's per-device ACL; but 65,000 sessions on the simulator's
machine are 65,000 sockets, keep-alives and broker sessions competing with the
server being measured (the embedded broker manages ~1,700 QoS 1
messages/s in all). So the rest of the fleet shares this relay: one session
subscribed to ``edgefleet/v1/devices/+/cmd`` that hands each command to the
device named in its topic. The server still publishes one QoS 1 message per
device on that device's own topic, so the broker and the server do exactly the
work a real fleet causes; only the simulator's side of the sockets is pooled.

The wildcard needs a broker login allowed to read every ``cmd`` topic: an
anonymous Mosquitto (the benchmark's), or an account the broker's ACL gives
that right. The embedded broker grants it to no device; there the relay's
subscription is refused, counted as an error, and those devices fall back to
polling (each linked device still hears its own commands).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.common.errors import ProtocolError
from agent.protocol import topics
from agent.protocol.api import MqttCredentials
from server.simulator.mqtt_link import LinkLimits, MqttLink

log = logging.getLogger(__name__)

RELAY_FILTER = f"{topics.PREFIX}/+/cmd"
Route = Callable[[str, dict[str, Any]], None]  # (device id, command)


class CommandRelay(MqttLink):
    """One MQTT session that routes every device's ``cmd`` messages by topic."""

    def __init__(self, name: str, creds: MqttCredentials, limits: LinkLimits, route: Route) -> None:
        self.route = route
        self.routed = 0
        self.refused = False  # the broker would not grant the wildcard subscription
        super().__init__(name, creds, limits)

    def _make_client(self) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"sim-{self.device_id}", protocol=paho.MQTTv311
        )
        if self.creds.username:
            client.username_pw_set(self.creds.username, self.creds.password)
        if self.creds.tls:
            client.tls_set()
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._done_write
        return client

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT login of the command relay refused: %s", reason)
            return
        client.subscribe(RELAY_FILTER, qos=1)
        self._connected.set()

    def _on_subscribe(self, _c: paho.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        if any(code.is_failure for code in codes):
            self.refused = True
            log.warning("the broker refused the command relay's %s subscription", RELAY_FILTER)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            device_id, channel = topics.parse(msg.topic)
            command = json_object(msg.payload)
        except (ValueError, ProtocolError):
            log.warning("ignored a malformed command on %s", msg.topic[:120])
            return
        if channel == "cmd" and command is not None:
            self.routed += 1
            self.route(device_id, command)


def json_object(raw: bytes | bytearray) -> dict[str, Any] | None:
    value = json.loads(raw)
    return value if isinstance(value, dict) else None

"""The embedded broker's logins and ACLs, and telemetry ingest, with real paho clients.

Ordering barriers replace sleeps: a broker delivers one client's messages in
order, so once a later, allowed message has arrived, an earlier forbidden one
would have arrived too.
"""

from __future__ import annotations

import json
import queue
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import requests
from paho.mqtt.enums import CallbackAPIVersion
from waiting import eventually

from agent.protocol import topics
from agent.protocol.api import EnrollResponse
from server.app import ServerHandle
from server.db import queries
from server.mqtt.broker import INTERNAL_USERNAME

WAIT_S = 20.0
ServerFactory = Callable[..., ServerHandle]


class Peer:
    """A paho client that records CONNACK, SUBACK and messages for the test to await."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str | None,
        password: str | None,
        *,
        client_id: str | None = None,
        clean: bool = True,
    ) -> None:
        self.connacks: queue.Queue[Any] = queue.Queue()
        self.subacks: queue.Queue[list[Any]] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{secrets.token_hex(4)}",
            clean_session=clean,
            protocol=paho.MQTTv311,
        )
        if username is not None:
            client.username_pw_set(username, password)
        client.on_connect = lambda _c, _u, _f, rc, _p: self.connacks.put(rc)
        client.on_subscribe = lambda _c, _u, _m, rcs, _p: self.subacks.put(list(rcs))
        client.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        client.connect(host, port)
        client.loop_start()
        self.client = client
        self.connack = self.connacks.get(timeout=WAIT_S)

    def subscribe(self, topic_filter: str) -> Any:
        self.client.subscribe(topic_filter, qos=1)
        return self.subacks.get(timeout=WAIT_S)[0]

    def publish(self, topic_name: str, payload: bytes | str) -> None:
        self.client.publish(topic_name, payload, qos=1).wait_for_publish(WAIT_S)

    def next_message(self) -> tuple[str, bytes]:
        return self.messages.get(timeout=WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(*args: Any, **kwargs: Any) -> Peer:
        peer = Peer(*args, **kwargs)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


def enroll(server: ServerHandle, hw: str) -> EnrollResponse:
    body = {
        "token": server.config.enrollment_tokens[0],
        "hardware_id": hw,
        "profile": "rpi4",
        "variant_preference": ["int8-cpu"],
        "agent_version": "0.1.0",
    }
    resp = requests.post(f"{server.url}/api/v1/enroll", json=body, timeout=10)
    assert resp.status_code == 200, resp.text
    return EnrollResponse.from_json(resp.json())


def device_peer(make: Callable[..., Peer], dev: EnrollResponse, **kw: Any) -> Peer:
    peer = make(dev.mqtt.host, dev.mqtt.port, dev.mqtt.username, dev.mqtt.password, **kw)
    assert not peer.connack.is_failure, peer.connack
    return peer


def latest(server: ServerHandle, device_id: str) -> dict[str, dict[str, Any]]:
    with server.db.session() as s:
        return {t.channel: t.payload for t in queries.latest_telemetry(s, device_id)}




def test_only_issued_credentials_log_in(
    module_server: ServerHandle, peers: Callable[..., Peer]
) -> None:
    dev = enroll(module_server, "hw-mqtt-login")
    host, port = dev.mqtt.host, dev.mqtt.port
    assert not peers(host, port, dev.device_id, dev.mqtt.password).connack.is_failure
    for username, password in (
        (dev.device_id, "wrong-password"),
        (dev.device_id, dev.device_token),  # the HTTP token is not the MQTT password
        ("dev-unknown", dev.mqtt.password),
        (INTERNAL_USERNAME, dev.mqtt.password),
        ("../../etc", "x"),
        (None, None),
    ):
        assert peers(host, port, username, password).connack.is_failure, username


def test_a_device_cannot_publish_as_another(
    module_server: ServerHandle, peers: Callable[..., Peer]
) -> None:
    a, b = enroll(module_server, "hw-acl-pub-a"), enroll(module_server, "hw-acl-pub-b")
    peer_a = device_peer(peers, a)
    for channel in ("telemetry", "state", "results", "events"):
        peer_a.publish(topics.topic(b.device_id, channel), json.dumps({"spoofed": True}))
    peer_a.publish(topics.topic(a.device_id, "cmd"), json.dumps({"spoofed": True}))
    peer_a.publish(f"edgefleet/v1/devices/{b.device_id}/telemetry/x", "{}")
    peer_a.publish("elsewhere/entirely", "{}")
    peer_a.publish(topics.topic(a.device_id, "telemetry"), json.dumps({"seq": 1}))
    assert eventually(lambda: "telemetry" in latest(module_server, a.device_id))
    assert latest(module_server, a.device_id) == {"telemetry": {"seq": 1}}
    assert latest(module_server, b.device_id) == {}


def test_a_device_cannot_read_another_devices_commands(
    module_server: ServerHandle, peers: Callable[..., Peer]
) -> None:
    a, b = enroll(module_server, "hw-acl-sub-a"), enroll(module_server, "hw-acl-sub-b")
    peer_a, peer_b = (
        device_peer(peers, a),
        device_peer(peers, b, client_id=f"agent-{b.device_id}", clean=False),
    )
    for topic_filter in (
        topics.topic(b.device_id, "cmd"),
        topics.topic(b.device_id, "telemetry"),
        "edgefleet/v1/devices/+/cmd",
        "edgefleet/#",
        "#",
    ):
        assert peer_a.subscribe(topic_filter).is_failure, topic_filter
    assert not peer_a.subscribe(topics.topic(a.device_id, "cmd")).is_failure
    assert not peer_b.subscribe(topics.topic(b.device_id, "cmd")).is_failure

    module_server.ingest.publish_command(b.device_id, {"cmd": "for-b"})
    module_server.ingest.publish_command(a.device_id, {"cmd": "for-a"})
    assert peer_b.next_message() == (topics.topic(b.device_id, "cmd"), b'{"cmd": "for-b"}')
    assert peer_a.next_message() == (topics.topic(a.device_id, "cmd"), b'{"cmd": "for-a"}')
    assert peer_a.messages.empty()

    # Taking over B's persistent session (client id) does not hand A B's subscription.
    peer_b.close()
    thief = device_peer(peers, a, client_id=f"agent-{b.device_id}", clean=False)
    assert not thief.subscribe(topics.topic(a.device_id, "cmd")).is_failure
    module_server.ingest.publish_command(b.device_id, {"cmd": "for-b-again"})
    module_server.ingest.publish_command(a.device_id, {"cmd": "for-a-again"})
    assert thief.next_message() == (topics.topic(a.device_id, "cmd"), b'{"cmd": "for-a-again"}')
    assert thief.messages.empty()


def test_ingest_stores_each_channel_and_drops_garbage(
    module_server: ServerHandle, peers: Callable[..., Peer]
) -> None:
    dev = enroll(module_server, "hw-ingest")
    peer = device_peer(peers, dev)
    rejected = module_server.ingest.stats.rejected

    def t(channel: str) -> str:
        return topics.topic(dev.device_id, channel)

    peer.publish(t("telemetry"), b"not json")
    peer.publish(t("telemetry"), b"[1, 2]")
    peer.publish(t("telemetry"), b"\xff\xfe")
    peer.publish(t("telemetry"), json.dumps({"x": "y" * module_server.config.max_telemetry_bytes}))
    peer.publish(t("results"), json.dumps({"top1": "3", "count": 7}))
    peer.publish(t("events"), json.dumps({"type": "commit", "state": "commit", "release": 2}))
    peer.publish(t("state"), b"offline")
    peer.publish(t("telemetry"), json.dumps({"fps": 30.5, "release": 2}))
    assert eventually(lambda: "telemetry" in latest(module_server, dev.device_id))
    assert latest(module_server, dev.device_id) == {
        "telemetry": {"fps": 30.5, "release": 2},
        "results": {"top1": "3", "count": 7},
        "events": {"type": "commit", "state": "commit", "release": 2},
        "state": {"status": "offline"},
    }
    assert module_server.ingest.stats.rejected - rejected == 4
    shown = requests.get(
        f"{module_server.url}/api/v1/devices/{dev.device_id}",
        headers={"Authorization": f"Bearer {module_server.operator_token}"},
        timeout=10,
    ).json()
    assert shown["telemetry"]["telemetry"]["payload"] == {"fps": 30.5, "release": 2}
    assert shown["events"][0]["type"] == "commit" and shown["events"][0]["source"] == "mqtt"


def test_broker_restart_keeps_port_and_ingest_recovers(
    server_factory: ServerFactory, tmp_path: Path, peers: Callable[..., Peer]
) -> None:
    server = server_factory(tmp_path)
    assert server.broker is not None
    dev = enroll(server, "hw-restart")
    port = server.mqtt_port
    server.broker.stop()
    assert eventually(lambda: not server.ingest.connected)
    with pytest.raises(OSError):
        Peer(dev.mqtt.host, port, dev.mqtt.username, dev.mqtt.password)
    assert server.broker.start() == port
    assert server.ingest.wait_connected(WAIT_S)
    peer = device_peer(peers, dev)
    peer.publish(topics.topic(dev.device_id, "telemetry"), json.dumps({"after": "restart"}))
    assert eventually(lambda: latest(server, dev.device_id) == {"telemetry": {"after": "restart"}})


@pytest.mark.production
def test_ingest_from_an_external_mosquitto(
    server_factory: ServerFactory, tmp_path: Path, mosquitto_url: str, peers: Callable[..., Peer]
) -> None:
    server = server_factory(tmp_path, mqtt_url=mosquitto_url)
    assert server.broker is None
    dev = enroll(server, "hw-mosquitto")
    endpoint = server.config.mqtt_endpoint()
    assert endpoint is not None
    assert (dev.mqtt.host, dev.mqtt.port) == (endpoint.host, endpoint.port)
    peer = device_peer(peers, dev)
    peer.publish(topics.topic(dev.device_id, "telemetry"), json.dumps({"via": "mosquitto"}))
    peer.publish(topics.topic("dev-not-enrolled", "telemetry"), json.dumps({"via": "nobody"}))
    assert eventually(lambda: latest(server, dev.device_id) == {"telemetry": {"via": "mosquitto"}})

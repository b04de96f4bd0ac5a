"""Per-device MQTT ACLs on both brokers: the embedded one, and Mosquitto set up by export-acl.

Device A must not publish under B's topics, nor read B's commands, while A's
own telemetry gets through. Ordering barriers replace sleeps: a broker
delivers in order, so once a later, allowed message has arrived, an earlier
forbidden one would have arrived before it.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from mosquitto_proc import INGEST_USER, Mosquitto, Peer, connack, wait_login
from waiting import eventually

from agent.protocol import topics
from agent.protocol.api import EnrollResponse
from server.app import ServerHandle
from server.cli import main as cli_main
from server.db import queries
from server.errors import ConfigError
from server.mqtt.acl import build_files, device_acl, ingest_password_hash

WAIT_S = 20.0


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


def latest(server: ServerHandle, device_id: str) -> dict[str, dict[str, Any]]:
    with server.db.session() as s:
        return {t.channel: t.payload for t in queries.latest_telemetry(s, device_id)}




@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(params=["embedded", "mosquitto"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[ServerHandle, Mosquitto | None]:
    if request.param == "embedded":
        return request.getfixturevalue("server_factory")(tmp_path / "server"), None
    broker: Mosquitto = request.getfixturevalue("mosquitto")  # torn down after the server
    server = request.getfixturevalue("server_factory")(
        tmp_path / "server", mqtt_url=broker.ingest_url
    )
    return server, broker


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(dev: EnrollResponse) -> Peer:
        peer = Peer(dev.mqtt.host, dev.mqtt.port, dev.mqtt.username, dev.mqtt.password)
        assert not peer.connack.is_failure, peer.connack
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


def test_device_a_can_neither_spoof_nor_eavesdrop_on_device_b(
    fleet: tuple[ServerHandle, Mosquitto | None], peers: Callable[..., Peer]
) -> None:
    server, mosquitto = fleet
    a, b = enroll(server, "hw-acl-a"), enroll(server, "hw-acl-b")
    host, port = a.mqtt.host, a.mqtt.port
    if mosquitto is not None:
        assert (host, port) == ("127.0.0.1", mosquitto.port)
        mosquitto.configure_from_server(server.url, server.operator_token)
        wait_login(host, port, a.device_id, a.mqtt.password)

    # Only each device's own, issued credentials log in.
    assert connack(host, port, a.device_id, "not-the-password").is_failure
    assert connack(host, port, b.device_id, a.mqtt.password).is_failure
    assert connack(host, port, "dev-unknown", a.mqtt.password).is_failure

    peer_a, peer_b = peers(a), peers(b)
    for topic_filter in (
        topics.topic(b.device_id, "cmd"),
        f"{topics.PREFIX}/+/cmd",
        f"{topics.PREFIX}/#",
        "#",
    ):
        # The embedded broker refuses in the SUBACK; Mosquitto 2.0 grants it but never delivers.
        peer_a.subscribe(topic_filter)
    assert not peer_a.subscribe(topics.topic(a.device_id, "cmd")).is_failure
    assert not peer_b.subscribe(topics.topic(b.device_id, "cmd")).is_failure

    for channel in ("telemetry", "state", "results", "events"):
        peer_a.publish(topics.topic(b.device_id, channel), json.dumps({"spoofed": channel}))
    peer_a.publish(topics.topic(a.device_id, "cmd"), json.dumps({"self": "command"}))
    peer_a.publish(topics.topic(a.device_id, "telemetry"), json.dumps({"seq": 1, "own": True}))
    assert eventually(lambda: "telemetry" in latest(server, a.device_id))
    assert latest(server, a.device_id) == {"telemetry": {"seq": 1, "own": True}}
    assert latest(server, b.device_id) == {}

    server.ingest.publish_command(b.device_id, {"cmd": "for-b"})
    server.ingest.publish_command(a.device_id, {"cmd": "for-a"})
    assert peer_b.next_message() == (topics.topic(b.device_id, "cmd"), b'{"cmd": "for-b"}')
    assert peer_a.next_message() == (topics.topic(a.device_id, "cmd"), b'{"cmd": "for-a"}')
    assert peer_a.messages.empty()
    assert peer_b.messages.empty()


def test_export_acl_writes_files_a_mosquitto_accepts(
    server_factory: Callable[..., ServerHandle], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = server_factory(tmp_path / "server")
    dev = enroll(server, "hw-export")
    out = tmp_path / "out"
    argv = ["--server", server.url, "--token", server.operator_token, "mqtt", "export-acl"]
    assert cli_main([*argv, str(out)]) == 0
    assert "no password for the ingest user" in capsys.readouterr().err  # embedded mode
    passwd, acl = (out / "passwd").read_text(), (out / "acl").read_text()
    assert stat.S_IMODE((out / "passwd").stat().st_mode) == 0o600
    (line,) = passwd.splitlines()
    user, _, digest = line.partition(":")
    assert user == dev.device_id and queries.mosquitto_verify(dev.mqtt.password, digest)
    assert "\n".join(device_acl(dev.device_id)) in acl
    assert f"topic read {topics.PREFIX}/+/+" in acl
    first = (out / "acl").read_bytes()
    assert cli_main([*argv, str(out)]) == 0
    assert (out / "acl").read_bytes() == first  # deterministic: safe to diff before a reload

    bad = requests.get(f"{server.url}/api/v1/mqtt/broker-files", timeout=10)
    assert bad.status_code == 401
    assert (
        cli_main(["--server", server.url, "--token", "x" * 20, "mqtt", "export-acl", str(out)]) == 1
    )


def test_acl_rules_and_garbage_rows() -> None:
    good_hash = queries.mosquitto_hash("pw")
    files = build_files(
        [
            ("dev-b", good_hash),
            ("dev-a", good_hash),
            ("bad id\nuser attacker", good_hash),
            ("dev-c", "plain-text-password"),
            ("dev-d", "$7$101$bad salt$x"),
        ],
        INGEST_USER,
        ingest_password_hash(INGEST_USER, "secret"),
    )
    assert files.devices == 2
    assert [ln.split(":")[0] for ln in files.passwd.splitlines()] == [INGEST_USER, "dev-a", "dev-b"]
    assert "attacker" not in files.acl and "dev-c" not in files.acl and "dev-d" not in files.passwd
    assert len(files.warnings) == 3
    assert device_acl("dev-a") == [
        "user dev-a",
        "topic write edgefleet/v1/devices/dev-a/telemetry",
        "topic write edgefleet/v1/devices/dev-a/events",
        "topic write edgefleet/v1/devices/dev-a/state",
        "topic write edgefleet/v1/devices/dev-a/results",
        "topic read edgefleet/v1/devices/dev-a/cmd",
    ]
    ingest_hash = ingest_password_hash(INGEST_USER, "secret")
    assert ingest_hash == ingest_password_hash(INGEST_USER, "secret")
    assert queries.mosquitto_verify("secret", ingest_hash)
    assert not queries.mosquitto_verify("other", ingest_hash)
    for bad_user in ("edgefleet:server", "with space", ""):
        with pytest.raises(ConfigError):
            build_files([], bad_user, None)

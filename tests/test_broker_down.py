"""Broker outage: a real agent keeps inferring while the broker is down; nothing is lost.

Both brokers: the embedded one (ServerHandle.broker stop/start) and a private
Mosquitto (stopped and restarted on the same port, with persistence, as in
production). The agent's outbox numbers every message (``seq``); the server
must receive every produced message exactly once and in order, so QoS 1
redeliveries (a PUBACK lost in the outage) are dropped by (device, seq).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from fleet_helpers import Operator, enroll_agent
from mosquitto_proc import Mosquitto, Peer, wait_login
from waiting import wait_for

from agent.protocol import topics
from server.app import ServerHandle
from server.telemetry.writer import IngestMessage

OUTAGE_WINDOWS = 4  # telemetry windows the agent produces while the broker is down


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(params=["embedded", "mosquitto", "mosquitto-ack-after-commit"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[ServerHandle, Mosquitto | None]:
    if request.param == "embedded":
        return request.getfixturevalue("server_factory")(tmp_path / "server"), None
    broker: Mosquitto = request.getfixturevalue("mosquitto")  # torn down after the server
    server = request.getfixturevalue("server_factory")(
        tmp_path / "server",
        mqtt_url=broker.ingest_url,
        ingest_ack_after_commit=request.param.endswith("after-commit"),
    )
    return server, broker


class Received:
    """Every message the server accepted for one device, in commit order."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self._lock = threading.Lock()
        self._items: list[tuple[int, str]] = []

    def __call__(self, message: IngestMessage) -> None:
        seq = message.payload.get("seq")
        if message.device_id == self.device_id and isinstance(seq, int):
            with self._lock:
                self._items.append((seq, message.channel))

    @property
    def seqs(self) -> list[int]:
        with self._lock:
            return [seq for seq, _ in self._items]

    def count(self, channel: str) -> int:
        with self._lock:
            return sum(1 for _, c in self._items if c == channel)


def produced(outbox: Path) -> list[int]:
    """Every seq the agent's outbox ever issued, minus what it still holds (never sent)."""
    with sqlite3.connect(outbox) as db:
        (last,) = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        unsent = {row[0] for row in db.execute("SELECT seq FROM outbox")}
    return [seq for seq in range(1, last + 1) if seq not in unsent]


def outage(server: ServerHandle, mosquitto: Mosquitto | None) -> tuple[Callable[[], None], ...]:
    if mosquitto is not None:
        return mosquitto.stop, mosquitto.start
    broker = server.broker
    assert broker is not None
    port = broker.port

    def restart() -> None:
        assert broker.start() == port

    return broker.stop, restart


def test_broker_outage_loses_no_message(
    fleet: tuple[ServerHandle, Mosquitto | None], tmp_path: Path
) -> None:
    server, mosquitto = fleet
    assert server.writer is not None
    op = Operator(server.url, server.operator_token)
    op.publish(1)
    agent = enroll_agent(
        server.url,
        server.config.enrollment_tokens[0],
        root_json=server.repo.metadata_dir / "1.root.json",
        work=tmp_path / "cam",
    )
    device_id = agent.identity.device_id
    received = Received(device_id)
    server.writer.add_listener(received)
    if mosquitto is not None:
        mosquitto.configure_from_server(server.url, server.operator_token)
        mq = agent.identity.mqtt
        wait_login(mq.host, mq.port, mq.username, mq.password)
    stop_broker, start_broker = outage(server, mosquitto)

    agent.start()
    try:
        op.assign(1, device=device_id)
        assert agent.checkin_once() is True
        wait_for("telemetry before the outage", lambda: received.count("telemetry") >= 2)

        stop_broker()
        before = agent.worker.windows_published
        wait_for(
            "windows produced during the outage",
            lambda: agent.worker.windows_published >= before + OUTAGE_WINDOWS,
        )
        assert agent.outbox.bytes_used > 0  # the agent is holding them
        start_broker()

        after = agent.worker.windows_published
        wait_for("the backlog and fresh windows", lambda: received.count("telemetry") > after)
    finally:
        agent.stop()

    expected = produced(agent.cfg.state_dir / "outbox.sqlite")
    assert len(expected) > after
    wait_for("every produced message", lambda: len(received.seqs) >= len(expected))
    assert received.seqs == expected  # all of them, once each, in order

    # The rollups count every window exactly once, replayed ones included.
    rows = op.call("GET", "/api/v1/telemetry", params={"device": device_id, "limit": 10_000})
    assert sum(r["windows"] for r in rows["rollups"]) == received.count("telemetry")
    assert all(r["release"] == 1 and r["model"] == "digits" for r in rows["rollups"])


def test_repeats_are_dropped_by_device_and_seq(
    server_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A QoS 1 redelivery (same seq) is stored once; a reset outbox (newer ts) starts over."""
    server = server_factory(tmp_path / "server")
    body = {
        "token": server.config.enrollment_tokens[0],
        "hardware_id": "hw-repeat",
        "profile": "rpi4",
        "variant_preference": ["int8-cpu"],
        "agent_version": "0.1.0",
    }
    dev = requests.post(f"{server.url}/api/v1/enroll", json=body, timeout=10).json()
    device_id = dev["device_id"]
    received = Received(device_id)
    assert server.writer is not None
    server.writer.add_listener(received)
    peer = Peer(
        dev["mqtt"]["host"], dev["mqtt"]["port"], dev["mqtt"]["username"], dev["mqtt"]["password"]
    )
    try:
        topic = topics.topic(device_id, "telemetry")
        for seq, ts in (
            (1, 100.0),
            (2, 101.0),
            (2, 101.0),
            (1, 100.0),
            (3, 102.0),
            (1, 500.0),
            (2, 501.0),
        ):
            peer.publish(topic, json.dumps({"seq": seq, "ts": ts, "inferences": 1}))
        wait_for("the last message", lambda: len(received.seqs) >= 5)
    finally:
        peer.close()
    assert received.seqs == [1, 2, 3, 1, 2]
    assert server.ingest.stats.duplicates == 2


def test_embedded_broker_stop_hands_over_every_acknowledged_message(
    server_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A device drops a message from its outbox on PUBACK, so stop() must deliver those."""
    server = server_factory(tmp_path / "server")
    assert server.broker is not None and server.writer is not None
    dev = requests.post(
        f"{server.url}/api/v1/enroll",
        json={
            "token": server.config.enrollment_tokens[0],
            "hardware_id": "hw-drain",
            "profile": "rpi4",
            "variant_preference": ["int8-cpu"],
            "agent_version": "0.1.0",
        },
        timeout=10,
    ).json()
    received = Received(dev["device_id"])
    server.writer.add_listener(received)
    mq = dev["mqtt"]
    peer = Peer(mq["host"], mq["port"], mq["username"], mq["password"])
    topic = topics.topic(dev["device_id"], "telemetry")
    infos = [
        (seq, peer.client.publish(topic, json.dumps({"seq": seq, "ts": float(seq)}), qos=1))
        for seq in range(1, 2001)
    ]
    wait_for("a first PUBACK", infos[0][1].is_published)
    server.broker.stop()  # mid-stream
    peer.close()
    acked = [seq for seq, info in infos if info.is_published()]
    assert 0 < len(acked) < len(infos)  # the stop really cut the stream
    wait_for("every acknowledged message", lambda: set(acked) <= set(received.seqs))

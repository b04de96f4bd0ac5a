"""Push-driven updates: a target change is pushed on the device's MQTT ``cmd`` topic,
paced, told once per device; polling is the long fallback and answers are conditional.

Real servers (SQLite + embedded broker, PostgreSQL + Mosquitto), real agents and
MQTT clients logged in with each device's own credentials.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import requests
from conftest import ServerFactory
from fleet_helpers import Operator, enroll_agent
from paho.mqtt.enums import CallbackAPIVersion
from rollout_helpers import Fleet, SimDevice
from waiting import wait_for

from agent.daemon import POLL_JITTER, Agent
from agent.protocol import topics
from agent.protocol.api import InstalledModel, checkin_body
from agent.transport.device_api import DeviceClient
from server.app import ServerHandle
from server.config import POLL_INTERVAL_S, PUSH_POLL_INTERVAL_S, MqttEndpoint
from server.db.tables import Database, Device, utcnow
from server.errors import InvalidInputError
from server.main import build_parser, config_from_args
from server.mqtt.ingest import IngestError, TelemetryIngest
from server.push import queue as push_queue
from server.push.pacer import PushPacer, PushStats

WAIT_S = 60.0
SETTLE_S = 1.5  # after the last expected command: long enough for a stray one to land
CHECKIN = "/api/v1/devices/{}/checkin"


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Where the server keeps its state: SQLite + embedded broker, or PostgreSQL + Mosquitto."""
    if request.param == "sqlite":
        return {}
    return {
        "db_url": request.getfixturevalue("pg_url"),
        "mqtt_url": request.getfixturevalue("mosquitto_url"),
        "rollout_scheduler": "thread",
    }


class CmdListener:
    """One MQTT client per device, logged in as that device, on its own ``cmd`` topic."""

    def __init__(self, server: ServerHandle, devices: list[SimDevice]) -> None:
        self.received: list[tuple[str, str, dict[str, Any], float]] = []  # owner, topic, cmd, t
        self._lock = threading.Lock()
        self._subscribed = threading.Semaphore(0)
        self.clients: list[paho.Client] = []
        for dev in devices:
            client = paho.Client(
                CallbackAPIVersion.VERSION2,
                client_id=f"cmd-{dev.device_id}",
                protocol=paho.MQTTv311,
            )
            client.username_pw_set(dev.device_id, dev.mqtt_password)
            client.on_message = self._recorder(dev.device_id)
            client.on_subscribe = lambda *_a: self._subscribed.release()
            client.connect(server.mqtt_host, server.mqtt_port)
            client.loop_start()
            client.subscribe(topics.topic(dev.device_id, "cmd"), qos=1)
            self.clients.append(client)
        for _ in devices:
            assert self._subscribed.acquire(timeout=WAIT_S), (
                "a device's subscription went unanswered"
            )

    def _recorder(self, owner: str) -> Any:
        def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
            command = json.loads(msg.payload)
            if isinstance(command, dict) and "action" in command:  # not a replayed state
                with self._lock:
                    self.received.append((owner, msg.topic, command, time.monotonic()))

        return on_message

    def commands(self) -> list[tuple[str, str, dict[str, Any], float]]:
        with self._lock:
            return list(self.received)

    def wait(self, count: int) -> list[tuple[str, str, dict[str, Any], float]]:
        wait_for(f"{count} pushed commands", lambda: len(self.commands()) >= count, WAIT_S)
        time.sleep(SETTLE_S)  # anything extra (a repeat, a stray) has time to arrive
        return self.commands()

    def close(self) -> None:
        for client in self.clients:
            client.disconnect()
            client.loop_stop()


@pytest.fixture
def listeners() -> Iterator[list[CmdListener]]:
    made: list[CmdListener] = []
    yield made
    for listener in made:
        listener.close()


def test_poll_interval_is_the_long_fallback_while_pushing(tmp_path: Path) -> None:
    from conftest import server_config  # noqa: PLC0415

    pushing = server_config(tmp_path, poll_interval_s=0.0).resolve()
    assert pushing.poll_interval_s == PUSH_POLL_INTERVAL_S == 900.0
    polling = server_config(tmp_path, poll_interval_s=0.0, push_rate_per_s=0).resolve()
    assert polling.poll_interval_s == POLL_INTERVAL_S
    assert server_config(tmp_path, poll_interval_s=1.0).resolve().poll_interval_s == 1.0
    args = build_parser().parse_args(["run", "--data", str(tmp_path), "--push-rate", "40"])
    config = config_from_args(args)
    assert (config.push_rate_per_s, config.resolve().poll_interval_s) == (40.0, 900.0)
    args = build_parser().parse_args(["run", "--data", str(tmp_path), "--poll-interval", "60"])
    assert config_from_args(args).resolve().poll_interval_s == 60.0


def run_agent(agent: Agent) -> threading.Thread:
    thread = threading.Thread(target=agent.run_forever, name="agent-under-test", daemon=True)
    thread.start()
    return thread


def test_agent_polling_every_15_min_installs_a_pushed_assignment_and_rollout_stage(
    server_factory: ServerFactory,
    backend: dict[str, Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.daemon")
    srv = server_factory(
        tmp_path / "server", poll_interval_s=0.0, rollout_tick_interval_s=0.2, **backend
    )
    op = Operator(srv.url, srv.operator_token)
    op.publish(1)
    op.publish(2)
    agent = enroll_agent(
        srv.url,
        srv.config.enrollment_tokens[0],
        root_json=srv.repo.metadata_dir / "1.root.json",
        work=tmp_path / "cam",
        tags=("fleet=push",),
    )
    device_id = agent.identity.device_id
    thread = run_agent(agent)
    try:
        wait_for("the first check-in", lambda: agent.status.checkins >= 1, WAIT_S)
        assert agent.poll_interval_s == PUSH_POLL_INTERVAL_S  # the server's fallback interval
        delays = {agent.poll_delay_s() for _ in range(50)}
        low, high = (PUSH_POLL_INTERVAL_S * j for j in POLL_JITTER)
        assert len(delays) > 1 and all(low <= d <= high for d in delays)

        # Subscribed: its "online" state (sent after the cmd subscription) reached the server.
        def online() -> bool:
            return op.latest(device_id, "state").get("status") == "online"

        wait_for("the agent online", online)

        op.assign(1, device=device_id)
        wait_for("release 1 installed", lambda: _installed(agent) == 1, WAIT_S)
        assert "check-in pushed by the server (operator)" in caplog.text

        rollout = op.call(
            "POST",
            "/api/v1/rollouts",
            json={"release": "digits@2", "select": ["fleet=push"], "stages": "100%",
                  "soak": "0s", "start": True},
        )  # fmt: skip
        wait_for("release 2 installed by the rollout", lambda: _installed(agent) == 2, WAIT_S)
        assert "check-in pushed by the server (desired)" in caplog.text
        assert op.call("GET", f"/api/v1/rollouts/{rollout['id']}")["state"] in (
            "running",
            "completed",
        )
        assert agent.last_reply is not None and agent.last_reply.etag is not None
    finally:
        agent.request_stop()
        thread.join(timeout=30)
    assert srv.pacer is not None and srv.pacer.stats.pushed >= 2


def _installed(agent: Agent) -> int | None:
    installed = agent.updater.installed()
    return None if installed is None else installed.release


def test_an_unchanged_answer_is_304_without_a_body_and_the_checkin_still_counts(
    server_factory: ServerFactory, backend: dict[str, Any], tmp_path: Path
) -> None:
    srv = server_factory(tmp_path / "server", **backend)
    fleet = Fleet(srv.url, srv.operator_token, srv.config.enrollment_tokens[0])
    fleet.publish(1)
    dev = fleet.enroll(1, tags=lambda _: {"fleet": "etag"})[0]
    url = srv.url + CHECKIN.format(dev.device_id)
    auth = {"Authorization": f"Bearer {dev.token}"}
    first = requests.post(url, json=checkin_body("idle", None, "0.1.0"), headers=auth, timeout=30)
    assert first.status_code == 200
    etag = first.headers["ETag"]
    assert etag.startswith('"') and len(etag) == 34
    canonical = json.dumps(first.json(), sort_keys=True, separators=(",", ":")).encode()
    assert first.content == canonical

    seen = fleet.call("GET", f"/api/v1/devices/{dev.device_id}")["last_seen"]
    running = InstalledModel("digits", 1, "int8-cpu", fleet.sha[1], "a")
    for header in (etag, f'W/{etag}, "other"', "*"):
        time.sleep(0.01)  # a later last_seen, however coarse the clock
        again = requests.post(
            url,
            json=checkin_body("verifying", running, "0.1.1"),
            headers={**auth, "If-None-Match": header},
            timeout=30,
        )
        assert (again.status_code, again.content, again.headers["ETag"]) == (304, b"", etag)
    device = fleet.call("GET", f"/api/v1/devices/{dev.device_id}")
    assert (device["state"], device["agent_version"]) == ("verifying", "0.1.1")
    assert device["last_seen"] > seen
    assert device["installed"]["release"] == 1

    # The agent's client: 304 hands back the answer it holds; a change is a new answer.
    client = DeviceClient(srv.url, dev.device_id, dev.token)
    reply = client.checkin("idle", None)
    assert reply.etag == etag and reply.desired is None
    assert client.checkin("idle", None, reply) is reply
    fleet.call("POST", "/api/v1/assignments", expect=201,
               json={"name": "digits", "release": 1, "device_id": dev.device_id})  # fmt: skip
    changed = client.checkin("idle", None, reply)
    assert changed.desired is not None and changed.desired.release == 1
    assert changed.etag not in (None, etag)
    assert client.checkin("idle", None, changed) is changed
    # An outdated ETag gets the whole current answer.
    stale = requests.post(
        url,
        json=checkin_body("idle", None, "0.1.0"),
        headers={**auth, "If-None-Match": etag},
        timeout=30,
    )
    assert stale.status_code == 200 and stale.json()["desired"]["release"] == 1


def test_pushes_are_paced_oldest_first_and_each_device_is_told_once(
    server_factory: ServerFactory,
    backend: dict[str, Any],
    tmp_path: Path,
    listeners: list[CmdListener],
) -> None:
    count, rate = 30, 15.0
    srv = server_factory(tmp_path / "server", push_rate_per_s=rate, **backend)
    fleet = Fleet(srv.url, srv.operator_token, srv.config.enrollment_tokens[0])
    devices = fleet.enroll(count, tags=lambda _: {"fleet": "paced"})
    listener = CmdListener(srv, devices)
    listeners.append(listener)
    order = [d.device_id for d in reversed(devices)]  # not the enrollment order
    base = utcnow()
    with srv.db.session() as s:
        for i, device_id in enumerate(order):
            push_queue.request(s, [device_id], "revert", base + timedelta(milliseconds=i))
        # Asked again before it was sent: still one request, one command.
        push_queue.request(s, order[:5], "revert", base + timedelta(milliseconds=count))
    began = time.monotonic()
    got = listener.wait(count)
    elapsed = got[-1][3] - began
    assert len(got) == count, f"{len(got)} commands for {count} devices"
    assert all(owner == topics.parse(topic)[0] for owner, topic, _, _ in got)
    assert {owner for owner, _, _, _ in got} == set(order)  # everyone, once
    # Oldest request first. A batch's commands go out together to different clients, which
    # MQTT does not order among themselves: compare batch by batch.
    assert srv.pacer is not None
    step = srv.pacer.batch
    expected = order[5:] + sorted(order[:5])  # one time for the last five: by device id
    owners = [owner for owner, _, _, _ in got]
    assert [set(owners[i : i + step]) for i in range(0, count, step)] == [
        set(expected[i : i + step]) for i in range(0, count, step)
    ]
    assert all(cmd == {"action": "checkin", "reason": "revert"} for _, _, cmd, _ in got)
    assert srv.pacer.depth() == 0
    assert srv.pacer.stats.pushed == count
    metrics = requests.get(
        srv.url + "/metrics",
        headers={"Authorization": f"Bearer {srv.operator_token}"},
        timeout=30,
    ).text
    assert f"edgefleet_push_commands_total {count}.0" in metrics
    assert "edgefleet_push_queue_depth 0.0" in metrics
    print(f"{count} pushes at {rate:g}/s took {elapsed:.2f}s (N/R = {count / rate:.2f}s)")


def test_a_tag_assignment_pushes_only_that_tag_and_never_another_devices_command(
    server_factory: ServerFactory,
    backend: dict[str, Any],
    tmp_path: Path,
    listeners: list[CmdListener],
) -> None:
    srv = server_factory(tmp_path / "server", **backend)
    fleet = Fleet(srv.url, srv.operator_token, srv.config.enrollment_tokens[0])
    fleet.publish(1)
    devices = fleet.enroll(4, tags=lambda i: {"store": "a" if i < 2 else "b"})
    listener = CmdListener(srv, devices)
    listeners.append(listener)
    if "mqtt_url" not in backend:
        # The embedded broker's ACL: a device subscribing to every cmd topic hears only its own.
        snoop = listener.clients[-1]
        snoop.subscribe(f"{topics.PREFIX}/+/cmd", qos=1)
    fleet.call("POST", "/api/v1/assignments", expect=201,
               json={"name": "digits", "release": 1, "tag": "store=a"})  # fmt: skip
    got = listener.wait(2)
    assert sorted(owner for owner, _, _, _ in got) == sorted(d.device_id for d in devices[:2])
    assert all(owner == topics.parse(topic)[0] for owner, topic, _, _ in got)
    assert all(cmd == {"action": "checkin", "reason": "operator"} for _, _, cmd, _ in got)
    # One device of store b: told alone, and only it.
    lone = devices[3].device_id
    fleet.call("POST", "/api/v1/assignments", expect=201,
               json={"name": "digits", "release": 1, "device_id": lone})  # fmt: skip
    got = listener.wait(3)
    assert len(got) == 3 and got[-1][:2] == (lone, topics.topic(lone, "cmd"))


def test_two_replicas_never_send_the_same_request(
    server_factory: ServerFactory,
    pg_url: str,
    mosquitto_url: str,
    tmp_path: Path,
    listeners: list[CmdListener],
) -> None:
    count = 60
    options = {"db_url": pg_url, "mqtt_url": mosquitto_url, "rollout_scheduler": "thread"}
    first = server_factory(tmp_path / "server", push_rate_per_s=200.0, **options)
    second = server_factory(tmp_path / "server", push_rate_per_s=200.0, **options)
    fleet = Fleet(first.url, first.operator_token, first.config.enrollment_tokens[0])
    devices = fleet.enroll(count, tags=lambda _: {"fleet": "replicas"})
    listener = CmdListener(first, devices)
    listeners.append(listener)
    with first.db.session() as s:
        push_queue.request(s, [d.device_id for d in devices], "desired")
    got = listener.wait(count)
    assert sorted(owner for owner, _, _, _ in got) == sorted(d.device_id for d in devices)
    assert first.pacer is not None and second.pacer is not None
    assert first.pacer.stats.pushed + second.pacer.stats.pushed == count


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A bare database with ten devices, dev-0 .. dev-9."""
    url = f"sqlite:///{tmp_path / 'push.db'}"
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    db = Database(url)
    db.create_all()
    with db.session() as s:
        for i in range(10):
            fields = {"id": f"dev-{i}", "hardware_id": f"hw-{i}", "token_hash": f"{i:064x}",
                      "mqtt_password_hash": "-", "profile": "x86-gateway", "tags": {},
                      "variant_preference": ["int8-cpu"], "agent_version": "0.1.0"}  # fmt: skip
            s.add(Device(created_at=utcnow(), **fields))
    yield db
    db.dispose()


def test_claims_are_disjoint_and_a_request_made_while_sending_is_kept(database: Database) -> None:
    ids = [f"dev-{i}" for i in range(10)]
    base = utcnow()
    with database.session() as s:
        for i, device_id in enumerate(ids):
            push_queue.request(s, [device_id], "desired", base + timedelta(milliseconds=i))
    with database.engine.connect() as first, database.engine.connect() as second:
        with first.begin():
            claimed = push_queue.claim(first, 5)
            assert [c.device_id for c in claimed] == ids[:5]
            if database.dialect == "postgresql":
                with second.begin():  # another pacer skips the rows being sent
                    assert [c.device_id for c in push_queue.claim(second, 5)] == ids[5:]
            # dev-0's target changes again while its push is on the way.
            later = base + timedelta(seconds=1)
            newer = threading.Thread(target=_request, args=(database, "dev-0", "operator", later))
            newer.start()  # on PostgreSQL it waits for the claim's commit
            push_queue.remove(first, claimed)
        newer.join(timeout=30)
        assert not newer.is_alive()
        with second.begin():
            left = push_queue.claim(second, 10)
    assert [c.device_id for c in left] == [*ids[5:], "dev-0"]
    assert left[-1].command() == {"action": "checkin", "reason": "operator"}


def _request(db: Database, device_id: str, reason: str, at: datetime | None = None) -> None:
    with db.session() as s:
        push_queue.request(s, [device_id], reason, at)


def test_a_failed_publish_leaves_the_request_queued(database: Database) -> None:
    with database.session() as s:
        assert push_queue.request(s, ["dev-1", "dev-2", "dev-1"], "shadow") == 2
        assert push_queue.request_tag(s, "store", "none", "operator") == 0
    # The server's real MQTT client, never connected: every publish fails.
    ingest = TelemetryIngest(database, MqttEndpoint("127.0.0.1", 9), "push-test", 1024)
    pacer = PushPacer(database, ingest.publish_command, 100.0)
    with pytest.raises(IngestError, match="not currently connected"):
        pacer.drain_once(10)
    assert pacer.depth() == 2 and pacer.stats == PushStats(pushed=0, failed=1)
    with pytest.raises(InvalidInputError):
        _request(database, "dev-1", "because")

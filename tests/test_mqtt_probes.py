"""Probes of the MQTT layer's promises, on the embedded broker and on a private Mosquitto.

Devices are enrolled against a real server and act with the stock Mosquitto
clients (``mosquitto_pub``/``mosquitto_sub``), or a raw socket where a client
must misbehave. Each probe was a finding against amqtt 0.12.1:

- a Last Will on another device's topic is refused (embedded) or never
  delivered (Mosquitto checks the ACL when it publishes the will), and never
  stored as the other device's event;
- a retained message of device A never reaches device B;
- an oversized PUBLISH drops the connection without the server buffering it;
- a client silent past 1.5x its keep-alive is dropped and its will stored;
- subscribe/unsubscribe churn loses no acknowledged QoS 1 message;
- a fresh ingest gets no storm of retained state, and a ``$share`` group
  splits the stream between ingest processes.

The shipped broker configurations (deploy/) are checked against the server's
settings, and the embedded broker's codec and router have unit tests.
Ordering barriers replace sleeps where absence is asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import queue
import secrets
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import server_config, service_unavailable
from hypothesis import given, settings
from hypothesis import strategies as st
from mosquitto_proc import DEPLOY_CONF, Mosquitto, directives, wait_login
from paho.mqtt.enums import MQTTProtocolVersion
from test_mqtt_acl import enroll, latest
from waiting import wait_for

from agent.protocol import topics
from agent.protocol.api import EnrollResponse
from server.app import ServerHandle
from server.db.queries import MOSQUITTO_ITERATIONS
from server.errors import ConfigError
from server.mqtt import broker_codec as codec
from server.mqtt.acl import DEFAULT_INGEST_USER, DEVICE_PUBLISH_CHANNELS
from server.mqtt.broker import MqttAuthorizer
from server.mqtt.broker_conn import KEEPALIVE_FACTOR
from server.mqtt.broker_core import Core, Session, matches, parse_shared
from server.mqtt.ingest import SUBSCRIPTIONS, TelemetryIngest, discard_session, ingest_protocol
from server.telemetry.writer import IngestMessage

PUB, SUB = "/usr/bin/mosquitto_pub", "/usr/bin/mosquitto_sub"
STDBUF = "/usr/bin/stdbuf"
ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 20.0
Fleet = tuple[ServerHandle, Mosquitto | None]


@pytest.fixture(autouse=True)
def _stock_clients() -> None:
    """The probes run the stock Mosquitto clients: a skip here, a failure in CI."""
    if not (os.access(PUB, os.X_OK) and os.access(SUB, os.X_OK)):
        service_unavailable("mosquitto_pub/mosquitto_sub", "apt-get install mosquitto-clients")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(params=["embedded", "mosquitto"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Fleet:
    factory = request.getfixturevalue("server_factory")
    if request.param == "embedded":
        return factory(tmp_path / "server"), None
    broker: Mosquitto = request.getfixturevalue("mosquitto")  # torn down after the server
    return factory(tmp_path / "server", mqtt_url=broker.ingest_url), broker


def devices(fleet: Fleet, *names: str) -> list[EnrollResponse]:
    """Enrolled devices whose credentials the broker accepts."""
    server, mosquitto = fleet
    enrolled = [enroll(server, f"hw-{name}-{secrets.token_hex(3)}") for name in names]
    if mosquitto is not None:
        mosquitto.configure_from_server(server.url, server.operator_token)
        for dev in enrolled:
            wait_login(dev.mqtt.host, dev.mqtt.port, dev.mqtt.username, dev.mqtt.password)
    return enrolled


def login(dev: EnrollResponse) -> list[str]:
    mq = dev.mqtt
    return ["-h", mq.host, "-p", str(mq.port), "-u", mq.username, "-P", mq.password]


class Client:
    """A ``mosquitto_sub`` (with ``-d``) whose output lines a test can await."""

    def __init__(self, argv: list[str]) -> None:
        line_buffered = [STDBUF, "-oL"] if os.access(STDBUF, os.X_OK) else []  # not a tty
        self.proc = subprocess.Popen(
            [*line_buffered, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def until(self, *needles: str) -> str | None:
        """The first line containing one of ``needles``; None if the client exits first."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                return None
            if any(n in line for n in needles):
                return line
        raise AssertionError(f"none of {needles} within {WAIT_S}s")

    def messages(self) -> list[str]:
        """Printed messages (``-v``: topic and payload), after the client exited."""
        self.proc.wait(WAIT_S)
        out: list[str] = []
        while (line := self.lines.get(timeout=WAIT_S)) is not None:
            if not line.startswith(("Client ", "Subscribed", "Warning")):
                out.append(line)
        return out

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(WAIT_S)


def will_client(dev: EnrollResponse, will_topic: str, payload: str) -> Client:
    """``dev`` connects with a will, as a device would; returns once it is in or refused."""
    will = ["--will-topic", will_topic, "--will-payload", payload, "--will-qos", "1"]
    return Client(
        [SUB, *login(dev), "-d", "-q", "1", "-t", topics.topic(dev.device_id, "cmd"), *will]
    )


def test_a_will_on_another_devices_topic_is_never_delivered_nor_stored(fleet: Fleet) -> None:
    server, mosquitto = fleet
    a, b, c = devices(fleet, "will-a", "will-b", "will-c")
    watcher = Client(
        [SUB, *login(b), "-d", "-v", "-q", "1", "-t", topics.topic(b.device_id, "cmd")]
    )
    assert watcher.until("received SUBACK")
    forged = {"type": "commit", "state": "commit", "release": 99, "forged": True}
    for channel in ("events", "state", "cmd", "telemetry"):
        attacker = will_client(a, topics.topic(b.device_id, channel), json.dumps(forged))
        line = attacker.until("received SUBACK", "Connection Refused", "not authorised")
        if mosquitto is None:
            # The embedded broker refuses the CONNECT outright.
            assert line is not None and "SUBACK" not in line, line
            assert attacker.proc.wait(WAIT_S) != 0
        else:
            assert line is not None and "SUBACK" in line  # Mosquitto checks at publish time
            attacker.kill()  # an abnormal end: the broker would publish the will now
    # Barrier: a legitimate will, published after the forged ones, reaches the store.
    honest = will_client(c, topics.topic(c.device_id, "state"), '{"status": "offline", "n": 1}')
    assert honest.until("received SUBACK")
    honest.kill()
    wait_for("the honest will", lambda: latest(server, c.device_id).get("state", {}).get("n") == 1)
    server.ingest.publish_command(b.device_id, {"action": "barrier"})
    assert watcher.until("barrier")
    watcher.kill()
    assert not [m for m in watcher.messages() if "forged" in m]
    assert latest(server, b.device_id) == {}  # nothing stored as B's event, state or telemetry


def test_a_retained_message_of_one_device_never_reaches_another(fleet: Fleet) -> None:
    server, _ = fleet
    a, b = devices(fleet, "ret-a", "ret-b")
    for channel in ("state", "telemetry", "events"):
        topic = topics.topic(a.device_id, channel)
        body = json.dumps({"status": "online", "secret": channel})
        subprocess.run([PUB, *login(a), "-q", "1", "-r", "-t", topic, "-m", body], check=True)
    wait_for("A's retained state stored", lambda: "state" in latest(server, a.device_id))
    for dev in (b, a):  # a device never gets another's retained state, nor its own on cmd
        cmd = topics.topic(dev.device_id, "cmd")
        filters = [cmd, "#", f"{topics.PREFIX}/+/state", topics.topic(a.device_id, "state")]
        sub = Client([SUB, *login(dev), "-d", "-v", "-q", "1", "-C", "1",
                      *[arg for f in filters for arg in ("-t", f)]])  # fmt: skip
        assert sub.until("received SUBACK")
        # Retained messages are queued at SUBSCRIBE, before this command: it comes after them.
        server.ingest.publish_command(dev.device_id, {"action": "checkin", "probe": "retained"})
        assert sub.messages() == [f'{cmd} {{"action": "checkin", "probe": "retained"}}']


def test_stock_clients_get_through_at_every_qos_and_protocol(fleet: Fleet) -> None:
    server, mosquitto = fleet
    (dev,) = devices(fleet, "versions")
    topic = topics.topic(dev.device_id, "telemetry")
    for version in ("mqttv31", "mqttv311", "mqttv5"):
        for qos in (0, 1, 2):
            sent: dict[str, Any] = {"version": version, "qos": qos}
            body = json.dumps(sent)
            result = subprocess.run(
                [PUB, *login(dev), "-V", version, "-q", str(qos), "-t", topic, "-m", body],
                capture_output=True, text=True, timeout=WAIT_S, check=False,
            )  # fmt: skip
            if version == "mqttv5" and mosquitto is None:
                assert result.returncode != 0  # the embedded broker speaks 3.1.1 and 3.1
                continue
            assert result.returncode == 0, result.stderr

            def arrived(expected: dict[str, Any] = sent) -> bool:
                return latest(server, dev.device_id).get("telemetry") == expected

            wait_for(f"{version} QoS {qos}", arrived)


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def test_an_oversized_publish_drops_the_connection_unbuffered(fleet: Fleet, tmp_path: Path) -> None:
    server, mosquitto = fleet
    (dev,) = devices(fleet, "big")
    big = tmp_path / "big.json"
    big.write_bytes(b'{"x": "' + b"y" * (50 * 1024 * 1024) + b'"}')
    pids = [os.getpid()] + ([mosquitto.process.pid] if mosquitto and mosquitto.process else [])
    before = {pid: rss(pid) for pid in pids}
    topic = topics.topic(dev.device_id, "telemetry")
    result = subprocess.run(
        [PUB, *login(dev), "-q", "1", "-t", topic, "-f", str(big)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode != 0, "the broker accepted a 50 MB packet"
    for pid in pids:  # the server (and broker) never held the 50 MB packet
        assert rss(pid) - before[pid] < 25 * 1024 * 1024, pid
    # The device may still publish normal telemetry; nothing of the big one was stored.
    subprocess.run([PUB, *login(dev), "-q", "1", "-t", topic, "-m", '{"after": "big"}'], check=True)
    wait_for("normal telemetry", lambda: "telemetry" in latest(server, dev.device_id))
    assert latest(server, dev.device_id) == {"telemetry": {"after": "big"}}


def raw_connect(dev: EnrollResponse, keepalive: int, will_topic: str, will: bytes) -> bytes:
    """A CONNECT packet built by hand (not with the broker's codec): clean, will at QoS 1."""

    def field(data: bytes) -> bytes:
        return struct.pack("!H", len(data)) + data

    flags = 0x80 | 0x40 | 0x08 | 0x04 | 0x02  # user, password, will QoS 1, will, clean
    body = field(b"MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
    body += field(f"raw-{secrets.token_hex(4)}".encode()) + field(will_topic.encode()) + field(will)
    body += field(dev.mqtt.username.encode()) + field(dev.mqtt.password.encode())
    assert 128 <= len(body) < 128 * 128  # a two-byte remaining length
    return bytes([0x10, 0x80 | (len(body) % 128), len(body) // 128]) + body


def test_a_silent_client_is_dropped_after_its_keepalive_and_its_will_stored(fleet: Fleet) -> None:
    server, _ = fleet
    (dev,) = devices(fleet, "silent")
    will = json.dumps({"status": "offline", "probe": "keepalive"}).encode()
    sock = socket.create_connection((dev.mqtt.host, dev.mqtt.port), timeout=WAIT_S)
    with sock:
        sock.sendall(raw_connect(dev, 1, topics.topic(dev.device_id, "state"), will))
        assert sock.recv(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
        try:
            closed = sock.recv(1) == b""  # silent from here on: the broker must hang up
        except ConnectionResetError:
            closed = True
        assert closed
    wait_for(
        "the will of the silent client",
        lambda: latest(server, dev.device_id).get("state", {}).get("probe") == "keepalive",
    )


class Received:
    """Sequence numbers the server accepted from one device."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.seqs: set[int] = set()
        self.lock = threading.Lock()

    def __call__(self, message: IngestMessage) -> None:
        seq = message.payload.get("seq")
        if message.device_id == self.device_id and isinstance(seq, int):
            with self.lock:
                self.seqs.add(seq)


def churn(dev: EnrollResponse, stop: threading.Event) -> None:
    """Subscribe and unsubscribe the device's cmd topic over and over, as clients come and go."""
    cmd = topics.topic(dev.device_id, "cmd")
    variants = (["-c", "-t", cmd], ["-c", "-t", cmd, "-U", cmd], ["-t", cmd, "-U", cmd])
    n = 0
    while not stop.is_set():
        args = variants[n % len(variants)]
        n += 1
        subprocess.run([SUB, *login(dev), "-i", f"churn-{dev.device_id}", "-q", "1", "-E", *args],
                       capture_output=True, timeout=WAIT_S, check=False)  # fmt: skip


def test_subscription_churn_loses_no_acknowledged_message(fleet: Fleet) -> None:
    server, _ = fleet
    publisher, *churners = devices(fleet, "churn-pub", *[f"churn-{i}" for i in range(6)])
    received = Received(publisher.device_id)
    assert server.writer is not None
    server.writer.add_listener(received)
    stop = threading.Event()
    threads = [threading.Thread(target=churn, args=(d, stop), daemon=True) for d in churners]
    for thread in threads:
        thread.start()
    n = 2000
    lines = "".join(json.dumps({"seq": i, "ts": float(i)}) + "\n" for i in range(1, n + 1))
    try:
        topic = topics.topic(publisher.device_id, "telemetry")
        result = subprocess.run([PUB, *login(publisher), "-q", "1", "-l", "-t", topic],
                                input=lines, capture_output=True, text=True, timeout=120,
                                check=False)  # fmt: skip
    finally:
        stop.set()
        for thread in threads:
            thread.join(WAIT_S)
    assert result.returncode == 0, result.stderr  # every message was acknowledged...
    wait_for("every acknowledged message", lambda: len(received.seqs) >= n)
    assert received.seqs == set(range(1, n + 1))  # ...and reached the store


def probe_ingest(server: ServerHandle, **kw: Any) -> TelemetryIngest:
    """A second ingest with the server's credentials and protocol (stores without a sink)."""
    ingest = TelemetryIngest(
        server.db,
        server.ingest.endpoint,
        f"probe-ingest-{secrets.token_hex(4)}",
        server.config.max_telemetry_bytes,
        protocol=server.ingest.protocol,
        **kw,
    )
    ingest.start(WAIT_S)
    return ingest


@pytest.fixture
def probes(fleet: Fleet) -> Iterator[Callable[..., TelemetryIngest]]:
    made: list[TelemetryIngest] = []

    def make(**kw: Any) -> TelemetryIngest:
        made.append(probe_ingest(fleet[0], **kw))
        return made[-1]

    yield make
    for ingest in made:
        ingest.stop()
        if fleet[1] is not None:
            discard_session(ingest.endpoint, ingest.client_id)


def test_a_fresh_ingest_gets_no_retained_state_and_a_share_group_splits_the_stream(
    fleet: Fleet, probes: Callable[..., TelemetryIngest]
) -> None:
    server, _ = fleet
    devs = devices(fleet, "storm-a", "storm-b", "storm-c")
    for dev in devs:  # every device leaves a retained state, as agents do
        online = json.dumps({"status": "online"})
        topic = topics.topic(dev.device_id, "state")
        subprocess.run([PUB, *login(dev), "-q", "1", "-r", "-t", topic, "-m", online], check=True)
    wait_for("retained states", lambda: all("state" in latest(server, d.device_id) for d in devs))

    fresh = probes()
    shared = [probes(share_group="edgefleet"), probes(share_group="edgefleet")]
    assert shared[0].subscriptions == [f"$share/edgefleet/{s}" for s in SUBSCRIPTIONS]
    n = 20
    lines = "".join(json.dumps({"seq": i, "ts": float(i)}) + "\n" for i in range(1, n + 1))
    topic = topics.topic(devs[0].device_id, "telemetry")
    subprocess.run([PUB, *login(devs[0]), "-q", "1", "-l", "-t", topic], input=lines, text=True,
                   check=True, timeout=WAIT_S)  # fmt: skip
    wait_for("the fresh ingest's messages", lambda: fresh.stats.stored >= n)
    wait_for("the group's messages", lambda: sum(i.stats.stored for i in shared) >= n)
    assert fresh.stats.stored == n  # the live messages, and no retained state
    assert sum(i.stats.stored for i in shared) == n  # each message to one member
    assert all(i.stats.stored > 0 for i in shared)


# -- the shipped broker configurations match the server ------------------------------------
def _size(text: str) -> int:
    units = {"KB": 1024, "MB": 1024 * 1024}
    for suffix, factor in units.items():
        if text.upper().endswith(suffix):
            return int(text[: -len(suffix)]) * factor
    return int(text)


def test_the_mosquitto_configuration_matches_the_server() -> None:
    conf = directives(DEPLOY_CONF.read_text())
    defaults = server_config(Path("/nonexistent"))
    assert int(conf["max_packet_size"][0]) == defaults.mqtt_max_packet_bytes
    assert conf["allow_anonymous"] == ["false"] and conf["persistence"] == ["true"]
    assert conf["acl_file"] and conf["password_file"]
    assert int(conf["max_queued_messages"][0]) >= 100_000  # the ingest's session must not drop


def test_the_emqx_configuration_matches_the_server() -> None:
    pyhocon = pytest.importorskip("pyhocon")
    conf = pyhocon.ConfigFactory.parse_file(str(ROOT / "deploy" / "emqx" / "emqx.conf"))
    defaults = server_config(Path("/nonexistent"))
    mqtt = conf["mqtt"]
    assert _size(str(mqtt["max_packet_size"])) == defaults.mqtt_max_packet_bytes
    assert float(mqtt["keepalive_multiplier"]) == KEEPALIVE_FACTOR
    assert mqtt["shared_subscription"] is True and mqtt["retain_available"] is True
    assert int(mqtt["max_mqueue_len"]) >= 100_000
    authz = conf["authorization"]
    assert authz["no_match"] == "deny"
    (source,) = [s for s in authz["sources"] if s["type"] == "file"]
    assert source["enable"] is True
    rules = (ROOT / "deploy" / "emqx" / "acl.conf").read_text()
    device = "edgefleet/v1/devices/${username}"
    for channel in DEVICE_PUBLISH_CHANNELS:
        assert f'"{device}/{channel}"' in rules
    assert f'{{allow, all, subscribe, [{{eq, "{device}/cmd"}}]}}.' in rules
    assert f'"{topics.PREFIX}/+/+"' in rules and rules.rstrip().endswith("{deny, all}.")
    assert f'{{allow, {{username, "{DEFAULT_INGEST_USER}"}}, subscribe' in rules
    assert conf["authentication"][0]["password_hash_algorithm"]["name"] == "pbkdf2"


@pytest.mark.production
def test_the_emqx_login_query_verifies_enrolled_devices(
    server_factory: Callable[..., ServerHandle], pg_url: str, tmp_path: Path
) -> None:
    """EMQX's PostgreSQL authenticator, as configured, accepts exactly the issued password."""
    pyhocon = pytest.importorskip("pyhocon")
    authn = pyhocon.ConfigFactory.parse_file(str(ROOT / "deploy" / "emqx" / "emqx.conf"))[
        "authentication"
    ][0]
    server = server_factory(tmp_path / "server", db_url=pg_url)
    dev = enroll(server, "hw-emqx-login")
    query = authn["query"].replace("${username}", "%(username)s")
    with server.db.engine.connect() as conn:
        row = conn.exec_driver_sql(query, {"username": dev.device_id}).one()
        assert conn.exec_driver_sql(query, {"username": "dev-nobody"}).first() is None
    algorithm = authn["password_hash_algorithm"]
    assert (algorithm["mac_fun"], algorithm["iterations"]) == ("sha512", MOSQUITTO_ITERATIONS)

    def emqx_check(password: str) -> bool:  # emqx_passwd: hex(pbkdf2(...)) == password_hash
        derived = hashlib.pbkdf2_hmac(
            "sha512", password.encode(), bytes(row.salt), algorithm["iterations"],
            algorithm["dk_length"],
        )  # fmt: skip
        return hmac.compare_digest(derived.hex(), row.password_hash)

    assert emqx_check(dev.mqtt.password)
    assert not emqx_check(dev.device_token)


def test_mqtt_limits_and_ingest_settings_are_checked(tmp_path: Path) -> None:
    for overrides, message in (
        ({"mqtt_max_packet_bytes": 64 * 1024}, "mqtt_max_packet_bytes"),
        ({"broker_max_queued_messages": 0}, "broker_max_queued_messages"),
        ({"broker_max_inflight_messages": 0}, "broker_max_inflight_messages"),
        ({"ingest_share_group": "a/b"}, "ingest_share_group"),
        ({"ingest_share_group": ""}, "ingest_share_group"),
        ({"ingest_mqtt_version": "4"}, "ingest_mqtt_version"),
    ):
        with pytest.raises(ConfigError, match=message):
            server_config(tmp_path / "server", **overrides).resolve()
    assert ingest_protocol("auto", external=True) == MQTTProtocolVersion.MQTTv5
    assert ingest_protocol("auto", external=False) == MQTTProtocolVersion.MQTTv311
    assert ingest_protocol("3.1.1", external=True) == MQTTProtocolVersion.MQTTv311


# -- the embedded broker's codec and router, without sockets --------------------------------
_topic = st.text(st.characters(blacklist_characters="+#\x00", blacklist_categories=["Cs"]),
                 min_size=1, max_size=40)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(topic=_topic, payload=st.binary(max_size=300), qos=st.integers(0, 2), retain=st.booleans())
def test_publish_round_trips(topic: str, payload: bytes, qos: int, retain: bool) -> None:
    packet = codec.Publish(topic, payload, qos, retain, qos > 0, 7 if qos else None)
    data = codec.encode(packet)
    frame = asyncio.run(_frame(data, len(data)))
    assert frame is not None and codec.decode(*frame) == packet


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64))
def test_garbage_is_a_packet_error_never_a_crash(data: bytes) -> None:
    for kind in range(16):
        for flags in (0, 2):
            with contextlib.suppress(codec.PacketError):
                codec.decode(kind, flags, data)


async def _frame(data: bytes, limit: int) -> tuple[int, int, bytes] | None:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await codec.read_packet(reader, limit)


def test_connect_subscribe_and_limits() -> None:
    will = codec.Will("a/b", b"bye", 1, True)
    connect = codec.Connect("c1", False, 30, will, "user", b"pw")
    assert codec.decode(*asyncio.run(_frame(codec.encode(connect), 1024)) or ()) == connect
    sub = codec.Subscribe(3, (("a/+", 1), ("$share/g/b/#", 0)))
    assert codec.decode(*asyncio.run(_frame(codec.encode(sub), 1024)) or ()) == sub
    header = bytes([0x30, 0xFF, 0xFF, 0xFF, 0x7F])  # a PUBLISH of 256 MB, no body sent
    with pytest.raises(codec.PacketTooLargeError):
        asyncio.run(_frame(header, 256 * 1024))
    with pytest.raises(codec.UnsupportedProtocolError):
        codec.decode(codec.CONNECT, 0, b"\x00\x04MQTT\x05\x02\x00\x00\x00\x00")
    with pytest.raises(codec.PacketError, match="UTF-8"):
        codec.decode(codec.PUBLISH, 0, b"\x00\x02\xff\xfe")


def test_routing_respects_read_rules_retained_and_share_groups() -> None:
    assert matches("a/+/c", "a/b/c") and matches("a/#", "a") and not matches("+/x", "$SYS/x")
    assert parse_shared("$share/g/a/+") == ("g", "a/+") and parse_shared("a/b") is None
    with pytest.raises(ValueError):
        parse_shared("$share//a")
    auth = MqttAuthorizer("secret", lambda _u, _p: True)
    core = Core(auth.may_receive, max_queued=3)
    a_state, b_cmd = topics.topic("dev-a", "state"), topics.topic("dev-b", "cmd")
    core.publish(a_state, b"online", 1, retain=True)
    b = Session("b", "dev-b", clean=False)
    core.sessions["b"] = b
    for topic_filter in ("#", b_cmd):
        core.subscribe(b, topic_filter, 1)
        assert list(core.retained_for(b, topic_filter, 1)) == []
    core.publish(a_state, b"live", 1, retain=False)
    assert list(b.queue) == []  # "#" matches, but B may not read A's topics
    ingest = [Session(f"i{n}", "edgefleet:server", clean=False, guaranteed=True) for n in (1, 2)]
    for session in ingest:
        core.sessions[session.client_id] = session
        core.subscribe(session, f"$share/g/{SUBSCRIPTIONS[2]}", 1)  # the state channel
    for n in range(4):
        core.publish(a_state, str(n).encode(), 1, retain=False)
    assert [len(s.queue) for s in ingest] == [2, 2]  # one member each, taking turns
    core.publish(a_state, b"more", 1, retain=False)
    assert not core.flow.is_set()  # a full ingest session pauses devices instead of dropping
    ingest[0].queue.clear()
    core.update_flow(ingest[0])
    assert core.flow.is_set()
    for n in range(5):
        core.publish(b_cmd, str(n).encode(), 1, retain=False)
    assert len(b.queue) == 3 and b.dropped == 2  # a device's queue drops the newest

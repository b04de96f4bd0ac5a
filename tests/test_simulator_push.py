"""Simulated devices learn of new targets as real ones do: a ``checkin`` command on their
MQTT ``cmd`` topic (their own session, or the shared relay for the rest of a large fleet),
conditional check-ins (If-None-Match, 304), and a long fallback poll."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from fleet_helpers import Operator
from paho.mqtt.enums import CallbackAPIVersion
from waiting import wait_for

from agent.protocol import topics
from agent.protocol.api import MqttCredentials
from server.app import ServerHandle
from server.config import parse_mqtt_url
from server.simulator import Fleet, FleetThread, SimConfig, WindowSpec, build_behaviour
from server.simulator.cmd_relay import CommandRelay
from server.simulator.http import DeviceHttp
from server.simulator.mqtt_link import LinkLimits
from server.simulator.stats import FleetStats

_REPLY = json.dumps({"desired": None, "poll_interval_s": 900}).encode()


def _answer(status: str, body: bytes, etag: str | None) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n"
    if etag:
        head += f'ETag: "{etag}"\r\n'
    return head.encode() + b"\r\n" + body


def _conditional_exchanges(send_etag: bool) -> tuple[list[str | None], list[Any]]:
    """Three check-ins against a server that honours If-None-Match when it sent an ETag."""
    asked: list[str | None] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            lines = {
                k.strip().lower(): v.strip()
                for k, _, v in (ln.partition(":") for ln in head.decode().split("\r\n")[1:])
            }
            await reader.readexactly(int(lines["content-length"]))
            tag = lines.get("if-none-match")
            asked.append(tag)
            if send_etag and tag == '"v1"':
                writer.write(b"HTTP/1.1 304 Not Modified\r\n\r\n")  # no length, no body
            else:
                writer.write(_answer("200 OK", _REPLY, "v1" if send_etag else None))
            await writer.drain()
        writer.close()

    async def run() -> list[Any]:
        server = await asyncio.start_server(script, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        http = DeviceHttp(url, 1, 5.0, FleetStats())
        out: list[Any] = []
        etag = None
        try:
            for _ in range(3):
                result = await http.checkin("dev-1", "tok", "idle", None, etag)
                out.append(result)
                etag = result.etag
        finally:
            await http.close()
            server.close()
        out.append(http.stats)
        return out

    return asked, asyncio.run(run())


def test_check_ins_are_conditional_and_a_304_keeps_the_last_answer() -> None:
    asked, (first, second, third, stats) = _conditional_exchanges(send_etag=True)
    assert asked == [None, '"v1"', '"v1"']
    assert first.reply is not None and first.reply.poll_interval_s == 900
    assert second.reply is None and third.reply is None and third.etag == '"v1"'
    assert (stats.checkins, stats.not_modified, dict(stats.errors)) == (3, 2, {})


def test_a_server_without_etags_is_simply_polled() -> None:
    asked, (first, second, _third, stats) = _conditional_exchanges(send_etag=False)
    assert asked == [None, None, None]
    assert first.reply is not None and second.reply is not None and second.etag is None
    assert (stats.checkins, stats.not_modified) == (3, 0)


def test_the_relay_hands_each_device_its_own_commands(mosquitto_url: str) -> None:
    endpoint = parse_mqtt_url(mosquitto_url)
    creds = MqttCredentials(endpoint.host, endpoint.port, "", "", endpoint.tls)
    heard: list[tuple[str, dict[str, Any]]] = []
    # The broker is shared: other servers' pushes may pass through; count only ours.
    ours = tuple(f"cam-{name}-{secrets.token_hex(4)}" for name in ("a", "b"))

    def mine() -> list[tuple[str, dict[str, Any]]]:
        return sorted(h for h in heard if h[0] in ours)

    async def run() -> int:
        relay = CommandRelay("relay-test", creds, LinkLimits(connect_timeout_s=5), _collect)
        assert await relay.connect()
        misc = asyncio.create_task(_drive(relay))
        await asyncio.sleep(0.5)  # let the SUBACK arrive
        sender = paho.Client(CallbackAPIVersion.VERSION2, client_id="relay-test-sender")
        sender.connect(endpoint.host, endpoint.port)
        sender.loop_start()
        for device in ours:
            body = json.dumps({"action": "checkin", "reason": f"for {device}"})
            sender.publish(topics.topic(device, "cmd"), body, qos=1).wait_for_publish(5)
        sender.publish(topics.topic(ours[0], "telemetry"), "{}", qos=1).wait_for_publish(5)
        for _ in range(50):
            if len(mine()) >= 2:
                break
            await asyncio.sleep(0.1)
        sender.loop_stop()
        sender.disconnect()
        misc.cancel()
        refused = relay.refused
        await relay.close()
        assert not refused
        return relay.routed

    def _collect(device_id: str, command: dict[str, Any]) -> None:
        heard.append((device_id, command))

    routed = asyncio.run(run())
    assert routed >= 2  # the telemetry message is not a command: never routed
    assert mine() == [(d, {"action": "checkin", "reason": f"for {d}"}) for d in ours]


async def _drive(relay: CommandRelay) -> None:
    while True:
        relay.misc()
        await asyncio.sleep(0.5)


def test_a_pushed_fleet_with_a_ten_minute_poll_completes_a_rollout(
    server_factory: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """With a 600 s poll, every stage after the first check-ins can only be learnt by push."""
    server = server_factory(tmp_path / "server", rollout_tick_interval_s=0.5, poll_interval_s=600.0)
    op = Operator(server.url, server.operator_token)
    op.publish(1)
    op.publish(2)
    cfg = SimConfig(
        devices=6,
        prefix="push",
        stores=3,
        regions=1,
        first_checkin_s=0.5,  # the first check-in comes soon; after it, 600 s
        telemetry=WindowSpec(window_s=0.5),
    )
    root = (server.repo.metadata_dir / "1.root.json").read_bytes()
    behaviour = build_behaviour(("x86-gateway",), seed=5)
    fleet = FleetThread(lambda: Fleet(server.url, cfg, behaviour, tmp_path / "c", pinned_root=root))
    fleet.start(lambda f: f.enroll(server.config.enrollment_tokens[0]))
    try:
        wait_for("every device's first check-in", lambda: fleet.report().checkins >= 6)
        polls = fleet.call(
            lambda f: {d.last_reply.poll_interval_s for d in f.devices if d.last_reply}
        )
        assert polls == {600.0}
        op.assign(1, tag="fleet=push")
        wait_for("release 1 everywhere", lambda: fleet.report().releases.get("digits@1") == 6)
        out = op.call("POST", "/api/v1/rollouts", json={
            "release": "digits@2", "select": ["fleet=push"], "stages": "1,50%,100%",
            "soak": "0s", "min_sample": 1, "max_latency_regression": None,
            "max_power_regression": None, "start": True})  # fmt: skip
        rollout = out["id"]
        wait_for(
            "the rollout to complete",
            lambda: op.call("GET", f"/api/v1/rollouts/{rollout}")["state"] == "completed",
            timeout_s=120,
        )
        report = fleet.report()
    finally:
        fleet.stop()
    assert report.releases == {"digits@2": 6}
    assert report.pushes >= 12  # each device told twice: the assignment, then its stage
    assert report.errors == 0, report.error_kinds


@pytest.mark.production
def test_devices_without_a_session_learn_through_the_relay(
    server_factory: Callable[..., ServerHandle], mosquitto_url: str, tmp_path: Path
) -> None:
    """The large-fleet path: no device has its own session; one relay subscription hears
    the server's per-device commands on Mosquitto, and a 600 s poll cannot be the way."""
    server = server_factory(tmp_path / "server", mqtt_url=mosquitto_url, poll_interval_s=600.0)
    op = Operator(server.url, server.operator_token)
    op.publish(1)
    endpoint = parse_mqtt_url(mosquitto_url)
    cfg = SimConfig(
        devices=5,
        prefix="relay",
        stores=2,
        regions=1,
        mqtt_devices=0,
        relay=MqttCredentials(endpoint.host, endpoint.port, "", "", endpoint.tls),
        first_checkin_s=0.5,
    )
    root = (server.repo.metadata_dir / "1.root.json").read_bytes()
    behaviour = build_behaviour(("rpi4",), seed=2)
    fleet = FleetThread(lambda: Fleet(server.url, cfg, behaviour, tmp_path / "c", pinned_root=root))
    fleet.start(lambda f: f.enroll(server.config.enrollment_tokens[0]))
    try:
        wait_for("every device's first check-in", lambda: fleet.report().checkins >= 5)
        op.assign(1, tag="fleet=relay")
        wait_for("release 1 everywhere", lambda: fleet.report().releases.get("digits@1") == 5)
        report = fleet.report()
        routed = fleet.call(lambda f: f.relay.routed if f.relay else 0)
    finally:
        fleet.stop()
    assert report.mqtt_linked == 0 and routed >= 5 and report.pushes >= 5
    assert report.errors == 0, report.error_kinds

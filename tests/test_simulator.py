"""The fleet simulator's pure parts and its HTTP pool: behaviour knobs, plans, wire payloads,
and keep-alive HTTP against scripted servers. Small fleets against a real server are in
``test_simulator_fleet.py``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.common.errors import ProtocolError
from agent.protocol.api import EVENTS_BATCH_PATH
from agent.protocol.manifest import Golden, ModelManifest
from agent.telemetry.window import TelemetryWindow
from agent.update.state_machine import Event, UpdateRecord
from server.errors import InvalidInputError
from server.simulator import (
    ProfileBehaviour,
    SharedArtifacts,
    SimConfig,
    WindowSpec,
    build_behaviour,
    parse_effect,
    parse_profile,
    plan_fleet,
)
from server.simulator.device import Context, SimDevice
from server.simulator.device_fetch import DeviceFetch
from server.simulator.http import DeviceHttp
from server.simulator.http_pool import HttpPool, HttpPoolError, PoolLimits
from server.simulator.payloads import latency_summary, telemetry_window
from server.simulator.stats import FleetStats
from server.telemetry.windows import RollupValues

LABELS = ",".join(str(i) for i in range(10))

# --- behaviour, pure ---------------------------------------------------------------------


def test_profile_and_effect_text_is_parsed() -> None:
    rpi = parse_profile("rpi4:weight=2,p95_ms=40,install_failure=5%")
    assert (rpi.weight, rpi.p95_ms, rpi.install_failure) == (2.0, 40.0, 0.05)
    assert rpi.power_mw == 4200.0  # the rest from the rpi4 default
    custom = parse_profile("lab-board:power_source=sensor")
    assert custom == ProfileBehaviour("lab-board", power_source="sensor")
    assert parse_effect("2:jetson-orin-nano:latency=1.4") == (
        2,
        "jetson-orin-nano",
        parse_effect("2:latency=1.4")[2],
    )
    release, profile, effect = parse_effect("3:silence=0.1,accuracy=0.8")
    assert (release, profile, effect.silence, effect.accuracy, effect.latency) == (
        3,
        None,
        0.1,
        0.8,
        1.0,
    )


@pytest.mark.parametrize(
    ("profiles", "effects", "message"),
    [
        (["rpi4:speed=2"], [], "unknown key 'speed'"),
        (["rpi4:p95_ms=-1"], [], "p95_ms and power_mw > 0"),
        (["rpi4:p95_ms"], [], "must look like key=value"),
        (["rpi4:power_source=solar"], [], "sensor or estimate"),
        (["rpi4:install_failure=1.5"], [], "fractions within 0..1"),
        (["rpi4:jitter=nan"], [], "must be finite"),
        (["bad name!"], [], "is not valid"),
        (["rpi4", "rpi4"], [], "each name once"),
        (["rpi4:weight=0"], [], "must not all be zero"),
        ([], ["2:latency=abc"], "latency='abc' is not a number"),
        ([], ["0:latency=1.1"], "must look like RELEASE[:PROFILE]"),
        ([], ["two:latency=1.1"], "must look like RELEASE[:PROFILE]"),
        ([], ["2:rpi4:x86:latency=1"], "must look like RELEASE[:PROFILE]"),
        ([], ["2:latency=0"], "multipliers must be within"),
        ([], ["2:rpi9:latency=1.2"], "names profile 'rpi9', which is not simulated"),
        ([], ["2:silence=-0.1"], "fractions within 0..1"),
    ],
)
def test_garbage_behaviour_is_refused_clearly(
    profiles: list[str], effects: list[str], message: str
) -> None:
    with pytest.raises(InvalidInputError) as err:
        build_behaviour(profiles, effects)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"devices": 0}, "devices must be within"),
        ({"prefix": "Bad_Prefix"}, "prefix"),
        ({"stores": 2, "regions": 3}, "regions <= stores"),
        ({"events": "smtp"}, "events must be one of"),
        ({"fail_step": "reboot"}, "fail_step must be one of"),
        ({"poll_s": 0.01}, "poll_s must be at least"),
        ({"telemetry": WindowSpec(window_s=0)}, "window_s and fps must be positive"),
    ],
)
def test_garbage_config_is_refused_clearly(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        SimConfig(**changes)
    assert message in str(err.value)


def test_traits_depend_only_on_seed_device_and_release() -> None:
    slow = build_behaviour(effects=["2:rpi4:latency=1.4,power=1.2"], seed=5)
    again = build_behaviour(effects=["2:rpi4:latency=1.4,power=1.2"], seed=5)
    other = build_behaviour(effects=["2:rpi4:latency=1.4,power=1.2"], seed=6)
    one, two = slow.traits("sim-000001", "rpi4", 1), slow.traits("sim-000001", "rpi4", 2)
    assert one == again.traits("sim-000001", "rpi4", 1)
    assert one != other.traits("sim-000001", "rpi4", 1)
    # The device is compared with itself: the injected factor, exactly.
    assert two.p95_ms / one.p95_ms == pytest.approx(1.4)
    assert two.power_mw / one.power_mw == pytest.approx(1.2)
    rpi5 = [slow.traits("sim-000001", "rpi5", release).p95_ms for release in (1, 2)]
    assert rpi5[0] == rpi5[1]


def test_rates_hold_over_a_large_fleet_and_only_for_their_release() -> None:
    behaviour = build_behaviour(
        ["rpi4:install_failure=0.02", "rpi5"], ["2:rpi4:install_failure=0.2,silence=0.1"], seed=3
    )
    ids = [f"sim-{i:06d}" for i in range(4000)]
    fails_2 = sum(behaviour.traits(i, "rpi4", 2).fails_install for i in ids)
    silent_2 = sum(behaviour.traits(i, "rpi4", 2).goes_silent for i in ids)
    fails_1 = sum(behaviour.traits(i, "rpi4", 1).fails_install for i in ids)
    assert 700 < fails_2 < 900 and 320 < silent_2 < 480 and 40 < fails_1 < 130
    assert not any(behaviour.traits(i, "rpi5", 2).fails_install for i in ids)


def test_profiles_are_assigned_in_exact_proportion_and_plans_are_stable() -> None:
    behaviour = build_behaviour(["rpi4:weight=3", "rpi5:weight=1", "x86-gateway:weight=1"], seed=9)
    names = behaviour.assign_profiles(1001)
    assert (names.count("rpi4"), names.count("rpi5"), names.count("x86-gateway")) == (601, 200, 200)
    assert names != sorted(names)  # mixed, not in blocks
    config = SimConfig(devices=100, prefix="lab", stores=10, regions=2, mqtt_devices=25)
    plan = plan_fleet(config, behaviour)
    assert plan == plan_fleet(config, behaviour)
    assert plan[7].hardware_id == "lab-000007" and plan[7].tags["fleet"] == "lab"
    assert len({p.tags["store"] for p in plan}) == 10
    assert {p.tags["region"] for p in plan} == {"lab-r0", "lab-r1"}
    linked = [p.index for p in plan if p.linked]
    assert linked == list(range(0, 100, 4))  # spread evenly, not the first 25


def test_a_window_has_the_agents_keys_and_its_p95_reaches_the_rollups() -> None:
    manifest = _manifest()
    traits = build_behaviour(["rpi4"], seed=1).traits("sim-000000", "rpi4", 1)
    payload = telemetry_window(
        seed=1,
        hardware_id="sim-000000",
        index=0,
        traits=traits,
        manifest=manifest,
        slot="a",
        profile="rpi4",
        spec=WindowSpec(),
    )
    real = TelemetryWindow(warmup=0)
    real.restart(manifest.to_custom())
    real.record(3_000_000, 4_000_000)
    agent_keys = set(real.snapshot("a") or {}) | {"profile", "runtime", "threads", "agent_version"}
    assert agent_keys <= set(payload)
    assert payload["invoke_ms"]["p95"] == pytest.approx(traits.p95_ms, rel=0.07)
    assert payload["power"]["source"] == "estimate" and payload["power"]["mw"] > 0
    rollup = RollupValues()
    rollup.add_window(json.loads(json.dumps(payload)))
    p95 = rollup.invoke_p95_ms()
    assert p95 is not None and p95 == pytest.approx(traits.p95_ms, rel=0.1)


def test_latency_summary_puts_p95_where_asked() -> None:
    summary = latency_summary(20.0, 30)
    assert summary["p95"] == pytest.approx(20.0, abs=0.001) and summary["count"] == 30
    assert summary["p50"] < summary["p90"] < summary["p95"] < summary["p99"] < summary["max"]


def _manifest() -> ModelManifest:
    return ModelManifest(
        name="digits",
        release=1,
        variant="int8-cpu",
        sha256="0" * 64,
        length=10,
        inputs=(),
        outputs=(),
        golden=Golden(seed="s", output_b64="AA=="),
        labels=tuple(LABELS.split(",")),
    )


# --- the HTTP pool against scripted servers ------------------------------------------------

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Any]


async def _with_server(script: Script, client: Callable[[HttpPool], Any]) -> Any:
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            await script(reader, writer, connections)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = HttpPool(f"http://127.0.0.1:{port}", PoolLimits(connections=1, timeout_s=5), "test")
    try:
        return await client(pool), connections
    finally:
        await pool.close()
        server.close()


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return await reader.readexactly(length)


def _ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def test_a_stale_keep_alive_connection_is_retried_once_on_a_fresh_one() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        body = await _read_request(reader)
        writer.write(_ok(body))  # echo, keep-alive...
        await writer.drain()
        if n == 1:
            await _read_request(reader)  # ...then drop the next request unanswered

    async def client(pool: HttpPool) -> list[bytes]:
        first = await pool.post("/a", b'{"n":1}', "tok")
        second = await pool.post("/a", b'{"n":2}', None)
        return [first[1], second[1]]

    bodies, connections = asyncio.run(_with_server(script, client))
    assert bodies == [b'{"n":1}', b'{"n":2}'] and connections == 2


def test_chunked_answers_are_read_and_broken_ones_refused() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _read_request(reader)
        writer.write(
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'4\r\n{"a"\r\n3\r\n:1}\r\n0\r\n\r\n'
        )
        await writer.drain()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n")
        await writer.drain()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _read_request(reader)  # closes without a word, on a fresh connection

    async def post(pool: HttpPool) -> Any:
        return await pool.post("/x", b"{}", None)

    (status, body, _), _ = asyncio.run(_with_server(chunked, post))
    assert (status, json.loads(body)) == (201, {"a": 1})
    with pytest.raises(ProtocolError, match="not an HTTP status line"):
        asyncio.run(_with_server(garbage, post))
    with pytest.raises(ProtocolError, match="exceeds"):
        asyncio.run(_with_server(huge, post))
    with pytest.raises(HttpPoolError, match="unanswered"):
        asyncio.run(_with_server(silent, post))


def test_update_reports_get_a_connection_before_routine_check_ins() -> None:
    order: list[str] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            try:
                body = await _read_request(reader)
            except asyncio.IncompleteReadError:
                return
            order.append(json.loads(body)["who"])
            writer.write(_ok(b"{}"))
            await writer.drain()

    async def client(pool: HttpPool) -> None:
        # One connection: the first request holds it while the others queue.
        first = asyncio.create_task(pool.post("/c", b'{"who": "first"}', None))
        await asyncio.sleep(0)
        queued = [
            asyncio.create_task(pool.post("/c", b'{"who": "checkin"}', None)),
            asyncio.create_task(pool.post("/e", b'{"who": "event"}', None, urgent=True)),
        ]
        await asyncio.gather(first, *queued)

    asyncio.run(_with_server(script, client))
    assert order == ["first", "event", "checkin"]


def test_an_unreachable_server_is_a_clear_error() -> None:
    async def post() -> Any:
        pool = HttpPool("http://127.0.0.1:1", PoolLimits(timeout_s=5), "test")
        return await pool.post("/x", b"{}", None)

    with pytest.raises(HttpPoolError, match=r"cannot connect to 127\.0\.0\.1:1"):
        asyncio.run(post())
    with pytest.raises(ValueError, match="plain http"):
        HttpPool("https://example.invalid", PoolLimits(), "test")


def test_an_update_reaches_http_as_one_batch_and_a_failed_batch_is_retried(
    tmp_path: Path,
) -> None:
    """A device without its own MQTT link posts its events over HTTP, batched by the agent's
    queue: nothing until the update ends, then the whole chain in one request; a refused
    POST keeps the batch for the next flush (the one at the end of ``SimDevice.update``)."""
    seen: list[tuple[str, list[tuple[str, str]]]] = []
    answers = [b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"]

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            body = json.loads(await reader.readexactly(length))
            path = head.split(b" ")[1].decode()
            seen.append((path, [(e["type"], e["state"]) for e in body["events"]]))
            stored = json.dumps({"stored": len(body["events"])}).encode()
            writer.write(answers.pop(0) if answers else _ok(stored))
            await writer.drain()
        writer.close()

    record, chain = UpdateRecord(), []
    ok = Event.SUCCESS
    for event in (Event.START, Event.UPDATE_AVAILABLE, ok, ok, ok, ok, ok, Event.DONE):
        record = record.advance(event)
        chain.append(("update", record.state.value))
    chain.insert(2, ("download", "done"))

    async def run() -> tuple[SimDevice, list[int]]:
        server = await asyncio.start_server(script, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        config = SimConfig(devices=1, mqtt_devices=0, events="mqtt")  # unlinked: HTTP anyway
        behaviour = build_behaviour(["rpi4"])
        stats = FleetStats()
        http = DeviceHttp(url, 2, 5.0, stats)
        fetch = DeviceFetch(url, 1, 5.0, stats, user_agent="test")
        artifacts = SharedArtifacts(url, b"{}", tmp_path)
        ctx = Context(config, behaviour, http, artifacts, stats, fetch)
        device = SimDevice(plan_fleet(config, behaviour)[0], "dev-sim-1", "tok", None, ctx)
        requests = []
        try:
            for kind, state in chain:
                await device.report(kind, state, {"target": "models/digits/1/int8-cpu.tflite"})
                requests.append(len(seen))
            await device.flush_events()
        finally:
            await http.close()
            await fetch.close()
            server.close()
        return device, requests

    device, requests = asyncio.run(run())
    assert requests == [0] * (len(chain) - 1) + [1]  # nothing posted before the update ended
    path = EVENTS_BATCH_PATH.format(device_id="dev-sim-1")
    assert seen == [(path, chain), (path, chain)]  # refused with 503, then sent again whole
    stats = device.ctx.stats
    assert stats.events == len(chain) and stats.errors == {"events: HTTP 503": 1}
    assert len(device.events) == 0 and device.events.dropped == 0

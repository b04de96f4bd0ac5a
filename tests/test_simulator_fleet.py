"""Small simulated fleets against a real server: the agent's update chain and reports,
TUF-verified targets fetched once for the fleet, failures, silence and golden-set misses,
per-device MQTT logins, and the ``edgefleet simulate`` entry point."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import FIXTURES, Operator, wait_for_deltas
from waiting import wait_for

from agent.common.errors import VerificationError
from agent.protocol.api import DesiredTarget, MqttCredentials
from server.app import ServerHandle
from server.simulator import Fleet, FleetThread, SimConfig, WindowSpec, build_behaviour
from server.simulator.artifacts import SharedArtifacts
from server.simulator.mqtt_link import LinkLimits, MqttLink

LABELS = ",".join(str(i) for i in range(10))


@pytest.fixture(scope="module")
def published(module_server: ServerHandle) -> ServerHandle:
    """Release 1, and release 2 with a golden set whose minimum accuracy is 0.9."""
    op = Operator(module_server.url, module_server.operator_token)
    op.publish(1)
    model, npz = FIXTURES / "digits_int8_r2.tflite", FIXTURES / "digits_val.npz"
    with open(model, "rb") as m, open(npz, "rb") as g:
        op.call(
            "POST",
            "/api/v1/models",
            files={"file": (model.name, m), "golden_set": ("val.npz", g)},
            data={
                "name": "digits",
                "release": "2",
                "variant": "int8-cpu",
                "labels": LABELS,
                "min_accuracy": "0.9",
                "input_range": "0,1",
            },
        )
    wait_for_deltas(op.call, "digits", 2)  # built after publish, by the server's worker
    return module_server


@pytest.fixture
def make_fleet(published: ServerHandle, tmp_path: Path) -> Iterator[Callable[..., FleetThread]]:
    threads: list[FleetThread] = []

    def make(
        prefix: str,
        profiles: tuple[str, ...],
        effects: tuple[str, ...] = (),
        devices: int = 6,
        **config: Any,
    ) -> FleetThread:
        cfg = SimConfig(
            devices=devices,
            prefix=prefix,
            stores=3,
            regions=1,
            poll_s=0.3,
            telemetry=WindowSpec(window_s=0.5),
            **config,
        )
        behaviour = build_behaviour(profiles, effects, seed=4)
        root = (published.repo.metadata_dir / "1.root.json").read_bytes()
        thread = FleetThread(
            lambda: Fleet(published.url, cfg, behaviour, tmp_path / prefix, pinned_root=root)
        )
        thread.start(lambda fleet: fleet.enroll(published.config.enrollment_tokens[0]))
        threads.append(thread)
        return thread

    yield make
    for thread in threads:
        thread.stop()


def _ids(fleet: FleetThread) -> list[str]:
    return fleet.call(lambda f: [d.device_id for d in f.devices])


def _events(op: Operator, device_id: str, source: str = "http") -> list[tuple[str, str]]:
    events = op.device(device_id)["events"]  # newest first
    return [
        (e["type"], e["state"])
        for e in reversed(events)
        if e["source"] == source and e["type"] != "enrolled"
    ]


AGENT_CHAIN = [
    ("update", "check_in"),
    ("update", "download"),
    ("download", "done"),
    ("update", "verify"),
    ("update", "install"),
    ("update", "smoke_test"),
    ("download", "aux"),  # as the agent: the metadata (and golden set) bytes it received
    ("update", "health"),
    ("update", "commit"),
    ("update", "idle"),
]


def test_a_small_fleet_installs_like_the_agent_and_shares_each_target_once(
    published: ServerHandle, make_fleet: Callable[..., FleetThread]
) -> None:
    op = Operator(published.url, published.operator_token)
    fleet = make_fleet("share", ("rpi4", "x86-gateway"))
    op.assign(1, tag="fleet=share")
    wait_for("release 1 everywhere", lambda: fleet.report().releases.get("digits@1") == 6)
    first = _ids(fleet)[0]
    wait_for("the commit reported", lambda: ("update", "idle") in _events(op, first))
    assert _events(op, first) == AGENT_CHAIN
    # And over MQTT, as the agent (its ingest may trail the batched HTTP copy).
    wait_for("the commit over MQTT", lambda: ("update", "commit") in _events(op, first, "mqtt"))
    window = wait_for("a telemetry window", lambda: op.latest(first, "telemetry").get("release"))
    assert window == 1
    assert fleet.call(lambda f: f.context().artifacts.downloads) == 1  # six devices, one fetch

    op.assign(2, tag="fleet=share")
    wait_for("release 2 everywhere", lambda: fleet.report().releases.get("digits@2") == 6)
    # A device's reports go out as one batch once its update ends: wait for the last ones.
    # The device view holds the 20 newest events, MQTT and HTTP copies alike, so the HTTP
    # copies of the first update may have left it: look for the end of the second.
    chain = wait_for("the second update reported", lambda: (
        c if (c := _events(op, first))[-1] == ("update", "idle")
        and ("golden_set", "scored") in c else None))  # fmt: skip
    assert chain[-4:] == [("golden_set", "scored"), *AGENT_CHAIN[-3:]]

    def release_2_counted() -> dict[str, Any] | None:
        bandwidth = op.call("GET", "/api/v1/bandwidth")
        found = [r for r in bandwidth["releases"] if r["release"] == 2]
        return found[0] if found and found[0]["updates"] == 6 else None

    release_2 = wait_for("six release-2 downloads counted", release_2_counted)
    assert release_2["updates"] == 6 and release_2["deltas"] == 6  # a signed delta, verified
    report = fleet.report()
    assert report.errors == 0 and report.committed == 12 and report.enrolled == 6


def test_failures_silence_and_golden_set_misses_follow_the_behaviour(
    published: ServerHandle, make_fleet: Callable[..., FleetThread]
) -> None:
    op = Operator(published.url, published.operator_token)
    fleet = make_fleet(
        "odd",
        ("rpi4", "jetson-orin-nano", "x86-gateway"),
        ("2:rpi4:install_failure=1", "2:jetson-orin-nano:silence=1", "2:x86-gateway:accuracy=0.5"),
    )
    op.assign(1, tag="fleet=odd")
    wait_for("release 1 everywhere", lambda: fleet.report().releases.get("digits@1") == 6)
    op.assign(2, tag="fleet=odd")
    wait_for("three attempts each", lambda: fleet.report().rolled_back == 4 * 3)
    report = fleet.report()
    assert report.silent == 2 and report.committed == 6 and report.releases == {"digits@1": 6}
    profiles = fleet.call(lambda f: {d.device_id: d.plan.profile for d in f.devices})
    for device_id, profile in profiles.items():
        detail = op.device(device_id)
        reasons = [
            (e["detail"] or {}).get("reason") or ""
            for e in detail["events"]
            if e["state"] == "rollback" and e["source"] == "http"
        ]
        if profile == "rpi4":
            assert reasons and "simulated smoke-test failure on rpi4" in reasons[0]
        elif profile == "x86-gateway":
            assert reasons and "golden-set accuracy 0.5000 is below" in reasons[0]
            scored = [
                e for e in detail["events"] if e["type"] == "golden_set" and e["source"] == "http"
            ]
            assert scored and scored[0]["detail"]["accuracy"] == 0.5
        else:
            assert not reasons
            seen = detail["last_seen"]
            time.sleep(1.0)  # three poll intervals: a talking device would check in
            assert op.device(device_id)["last_seen"] == seen


def test_mqtt_links_log_in_with_each_devices_own_credentials(
    published: ServerHandle, make_fleet: Callable[..., FleetThread]
) -> None:
    op = Operator(published.url, published.operator_token)
    fleet = make_fleet("mq", ("rpi4",), devices=2)
    first, second = _ids(fleet)
    wait_for(
        "both online",
        lambda: all(op.latest(d, "state").get("status") == "online" for d in (first, second)),
    )

    async def log_in(_f: Fleet, username: str, password: str) -> bool:
        creds = MqttCredentials(published.mqtt_host, published.mqtt_port, username, password)
        return await MqttLink(username, creds, LinkLimits(connect_timeout_s=2)).connect()

    assert fleet.run(lambda f: log_in(f, first, "wrong")) is False
    password = fleet.call(lambda f: f.devices[1].mqtt.password if f.devices[1].mqtt else "")
    assert fleet.run(lambda f: log_in(f, first, password)) is False  # another device's
    assert fleet.report().error_kinds == {}


@pytest.mark.parametrize(
    "broker", ["embedded", pytest.param("mosquitto", marks=pytest.mark.production)]
)
def test_a_hung_device_leaves_its_offline_will(
    server_factory: Callable[..., ServerHandle],
    request: pytest.FixtureRequest,
    broker: str,
    tmp_path: Path,
) -> None:
    """Both brokers enforce keep-alive: a silent device's will marks it offline."""
    mqtt_url = request.getfixturevalue("mosquitto_url") if broker == "mosquitto" else None
    server = server_factory(tmp_path / "server", mqtt_url=mqtt_url)
    op = Operator(server.url, server.operator_token)
    config = SimConfig(devices=1, prefix="hung", poll_s=0.3, mqtt=LinkLimits(keepalive_s=1))
    root = (server.repo.metadata_dir / "1.root.json").read_bytes()
    fleet = FleetThread(
        lambda: Fleet(
            server.url, config, build_behaviour(("rpi4",)), tmp_path / "c", pinned_root=root
        )
    )
    fleet.start(lambda f: f.enroll(server.config.enrollment_tokens[0]))
    try:
        (device_id,) = _ids(fleet)
        wait_for("online", lambda: op.latest(device_id, "state").get("status") == "online")
        fleet.call(lambda f: f.devices[0].go_silent())
        wait_for(
            "the offline will", lambda: op.latest(device_id, "state").get("status") == "offline"
        )
    finally:
        fleet.stop()


def test_an_unsigned_target_is_refused_before_any_byte_is_fetched(
    published: ServerHandle, tmp_path: Path
) -> None:
    root = (published.repo.metadata_dir / "1.root.json").read_bytes()

    async def lookup(path: str) -> Any:
        artifacts = SharedArtifacts(published.url, root, tmp_path / "c")
        return await artifacts.model(DesiredTarget(path, "digits", 9, "int8-cpu"))

    with pytest.raises(VerificationError, match="not a signed target"):
        asyncio.run(lookup("models/digits/9/int8-cpu.tflite"))
    with pytest.raises(VerificationError, match="director asked for digits@9"):
        asyncio.run(lookup("models/digits/1/int8-cpu.tflite"))


def test_the_cli_runs_a_fleet_and_prints_json(published: ServerHandle) -> None:
    script = Path(__file__).parent.parent / "scripts" / "simulate_fleet.py"
    token = published.config.enrollment_tokens[0]
    base = [
        sys.executable,
        str(script),
        "--server",
        published.url,
        "--json",
        "--devices",
        "3",
        "--prefix",
        "cli",
        "--duration",
        "2",
        "--poll",
        "0.5",
    ]

    def run(*extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *extra], capture_output=True, text=True, timeout=120, check=False, env=env
        )

    done = run("--enroll-token", token)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["enrolled"] == 3 and report["checkins"] >= 3 and report["errors"] == 0
    bad = run("--enroll-token", token, "--effect", "2:latency=fast")
    assert bad.returncode == 1 and "latency='fast' is not a number" in bad.stderr
    relay = run("--enroll-token", token, "--relay-mqtt", "http://user:secret@host")
    assert relay.returncode == 1 and "--relay-mqtt must look like mqtt://" in relay.stderr
    assert "secret" not in relay.stderr
    no_token = run(env={"PATH": "/usr/bin"})
    assert no_token.returncode == 1 and "no enrollment token" in no_token.stderr

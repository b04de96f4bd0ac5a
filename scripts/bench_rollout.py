#!/usr/bin/env python3
"""A 4-stage rollout over 65,000 simulated devices against the server on PostgreSQL.

    .venv/bin/python scripts/bench_rollout.py [--devices N] [--db-url URL] [--mqtt-url URL]

1. A fresh schema in PostgreSQL (127.0.0.1:5432, database ``test``), dropped at the end.
2. ``edgefleet-server run`` in its own process on 127.0.0.1 (PostgreSQL, Mosquitto or
   ``--embedded-broker``), the rollout scheduler ticking every ``--tick`` seconds.
3. Releases 1 and 2 of the test model published over REST. The devices are created
   directly in the database with the server's own ``store.enroll_device`` and
   ``store.record_checkin`` (already on release 1): enrolling 65,000 devices over
   HTTP would measure enrollment. Everything after that goes over the wire.
4. The simulator (this process) runs every device: check-ins over HTTP, update
   events over HTTP (and MQTT for the linked sample), telemetry windows over MQTT
   for ``--mqtt-devices`` devices spread over the fleet (the gates' sample).
5. A rollout of release 2 to all of them, stages 1%,10%,50%,100%, soak ``--soak``.
   The engine tick is timed by the server's own scheduler, which keeps the
   rollout's device facts in memory between ticks (``rollout.service.snapshot``):
   the mean over the rollout comes from its ``edgefleet_rollout_tick_seconds`` and
   ``edgefleet_rollout_ticks`` counters on ``/metrics``, read before and after.

Loopback only; bounded by ``--max-minutes``. The last line is exactly
``devices=N checkins_per_s=X p99_ms=Y errors=E tick_ms=T``: check-ins per second
and their p99 over the rollout, every error the simulated devices met (plus one
if the rollout did not complete within the run), and the mean engine tick.
With ``--shadow-every N`` every stage first shadows the candidate (the linked
sample reports agreement) and ``shadow_windows=W`` is appended.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import requests  # noqa: E402
from psycopg import sql  # noqa: E402

from agent.protocol.api import DesiredTarget, InstalledModel, MqttCredentials  # noqa: E402
from agent.protocol.manifest import model_target_path  # noqa: E402
from server.config import parse_mqtt_url  # noqa: E402
from server.db.tables import Database  # noqa: E402
from server.simulator import Fleet, FleetThread, SimConfig, WindowSpec, build_behaviour  # noqa: E402
from server.simulator.provision import provision  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
STAGES = "1%,10%,50%,100%"


@dataclass(frozen=True)
class Bench:
    devices: int
    db_url: str
    mqtt_url: str | None
    mqtt_devices: int
    poll_s: float
    tick_s: float
    soak: str
    window_s: float
    connections: int
    max_minutes: float
    shadow_every: int = 0  # 0: no shadow phase
    shadow_duration: str = "10s"
    shadow_timeout: str = "2m"
    status_every_s: float = 5.0


def say(text: str) -> None:
    print(text, flush=True)


@contextmanager
def fresh_schema(url: str) -> Iterator[str]:
    """A new schema for this run; the URL handed on puts it first on the search path."""
    schema = f"bench_{secrets.token_hex(4)}"
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    sep = "&" if "?" in url else "?"
    try:
        yield f"{url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server_process(bench: Bench, db_url: str, data: Path) -> Iterator[dict[str, Any]]:
    port, token, enroll = free_port(), secrets.token_urlsafe(24), secrets.token_urlsafe(16)
    cmd = [
        sys.executable,
        "-m",
        "server.main",
        "run",
        "--data",
        str(data),
        "--port",
        str(port),
        "--db-url",
        db_url,
        "--operator-token",
        token,
        "--enrollment-token",
        enroll,
        "--poll-interval",
        str(bench.poll_s),
        "--log-level",
        "warning",
        "--ingest-client-id",
        f"bench-ingest-{secrets.token_hex(4)}",
    ]
    if bench.mqtt_url:
        cmd += ["--mqtt-url", bench.mqtt_url]
    env = {**os.environ, "EDGEFLEET_ROLLOUT_TICK_S": str(bench.tick_s)}
    log = open(data / "server.log", "w")  # noqa: SIM115 - closed below
    # Its own session: a Ctrl-C meant for the benchmark must not stop the server under it.
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: see {data / 'server.log'}")
            try:
                if requests.get(url + "/healthz", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not come up within 60 s")
            time.sleep(0.3)
        yield {"url": url, "token": token, "enroll": enroll, "pid": proc.pid, "db_url": db_url}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def publish(url: str, token: str) -> dict[int, dict[str, Any]]:
    out = {}
    for release in (1, 2):
        model = FIXTURES / f"digits_int8_r{release}.tflite"
        with open(model, "rb") as fh:
            resp = requests.post(
                url + "/api/v1/models", headers={"Authorization": f"Bearer {token}"},
                files={"file": (model.name, fh)}, timeout=300,
                data={"name": "digits", "release": str(release), "variant": "int8-cpu",
                      "labels": ",".join(str(i) for i in range(10)), "input_range": "0,1"},
            )  # fmt: skip
        resp.raise_for_status()
        out[release] = resp.json()
    return out


def broker_for_devices(bench: Bench, url: str, token: str) -> MqttCredentials:
    """Where devices publish: the external broker, or the embedded one the server runs."""
    if bench.mqtt_url:
        endpoint = parse_mqtt_url(bench.mqtt_url)
        return MqttCredentials(endpoint.host, endpoint.port, "", "", endpoint.tls)
    resp = requests.post(url + "/api/v1/enroll", timeout=30, json={
        "token": token, "hardware_id": "bench-probe", "profile": "x86-gateway",
        "variant_preference": ["int8-cpu"], "tags": {"fleet": "probe"}, "agent_version": "0",
    })  # fmt: skip
    resp.raise_for_status()
    mqtt = resp.json()["mqtt"]
    return MqttCredentials(mqtt["host"], int(mqtt["port"]), "", "", bool(mqtt["tls"]))


def progress(done: int, total: int) -> None:
    if done % 10_000 == 0 or done == total:
        say(f"  provisioned {done}/{total}")


def tick_counters(url: str, token: str) -> tuple[float, float]:
    """The server's (ticks, seconds ticking) so far, from ``/metrics``."""
    text = requests.get(
        url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=60
    ).text
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("edgefleet_rollout_ticks_total", "edgefleet_rollout_tick_seconds_total"):
            found[name] = float(value)
    return (
        found.get("edgefleet_rollout_ticks_total", 0.0),
        found.get("edgefleet_rollout_tick_seconds_total", 0.0),
    )


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} {five:.1f} {fifteen:.1f} on {os.cpu_count()} cores"


def run(bench: Bench, work: Path) -> str:
    say(f"start: {load_average()}")
    with fresh_schema(bench.db_url) as db_url, server_process(bench, db_url, work) as srv:
        say(
            f"server pid {srv['pid']} at {srv['url']} on PostgreSQL "
            f"({'MQTT ' + bench.mqtt_url if bench.mqtt_url else 'embedded broker'})"
        )
        published = publish(srv["url"], srv["token"])
        r1 = published[1]
        stores = max(1, bench.devices // 20)  # 20 cameras a store, 20 regions
        config = SimConfig(
            devices=bench.devices,
            prefix="bench",
            stores=stores,
            regions=min(20, stores),
            http_connections=bench.connections,
            mqtt_devices=bench.mqtt_devices,
            telemetry=WindowSpec(window_s=bench.window_s),
            poll_s=None,
        )
        behaviour = build_behaviour(seed=1)
        db = Database(db_url)
        mqtt = broker_for_devices(bench, srv["url"], srv["enroll"])
        installed = InstalledModel("digits", 1, "int8-cpu", r1["sha256"], "a")
        started = time.perf_counter()
        fleet_plan = Fleet(srv["url"], config, behaviour, work / "cache").plan
        creds = provision(db, fleet_plan, mqtt, installed, batch=2000, progress=progress)
        say(
            f"{len(creds)} devices created directly in the database with the server's store "
            f"functions in {time.perf_counter() - started:.1f} s (no HTTP enrollment); "
            "all traffic from here on is HTTP/MQTT"
        )
        root = requests.get(srv["url"] + "/tuf/metadata/1.root.json", timeout=30).content
        desired = DesiredTarget(model_target_path("digits", 1, "int8-cpu"), "digits", 1, "int8-cpu")
        fleet = FleetThread(
            lambda: Fleet(srv["url"], config, behaviour, work / "cache", pinned_root=root)
        )
        fleet.start(lambda f: f.adopt(creds, desired))
        try:
            return drive(bench, fleet, srv)
        finally:
            fleet.stop(60)
            db.dispose()


def watch(bench: Bench, fleet: FleetThread, op: requests.Session, url: str) -> tuple[str, int]:
    """Print each change of the rollout until it stops running, the time is up or Ctrl-C."""
    end = time.monotonic() + bench.max_minutes * 60
    state, stage, last_line = "running", 1, ""
    try:
        while time.monotonic() < end:
            detail = op.get(url, timeout=120).json()
            state, stage = detail["state"], detail["stage"]
            waiting = "; ".join(detail.get("waiting") or [])
            line = f"stage {stage}/4 {state}: {detail['reason'][:120]}" + (
                f" [waiting: {waiting[:160]}]" if waiting else ""
            )
            if line != last_line:
                report = fleet.report()
                say(
                    f"[{report.elapsed_s:7.1f} s] {line} | {report.checkins_per_s:.0f} "
                    f"check-ins/s, p99 {report.checkin_p99_ms} ms, {report.errors} errors, "
                    f"tick {(detail.get('decision') or {}).get('tick_ms')} ms"
                )
                last_line = line
            if state not in ("running", "awaiting_approval"):
                break
            time.sleep(bench.status_every_s)
    except KeyboardInterrupt:  # Ctrl-C: stop here and still report what was measured
        say("interrupted")
    return state, stage


def drive(bench: Bench, fleet: FleetThread, srv: dict[str, Any]) -> str:
    op = requests.Session()
    op.headers["Authorization"] = f"Bearer {srv['token']}"
    op.headers["Connection"] = "close"  # a kept-alive socket may meet uvicorn's 5 s idle close
    windows = fleet.report().windows
    linked = fleet.report().mqtt_linked
    say(f"waiting for baseline telemetry from {linked} MQTT-linked devices")
    deadline = time.monotonic() + 3 * bench.window_s + 30
    while fleet.report().windows < windows + linked and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2.0)  # let the server's telemetry writer flush the baseline
    fleet.call(lambda f: f.stats.reset_checkins())
    body = {"release": "digits@2", "select": ["fleet=bench"], "stages": STAGES,
            "soak": bench.soak, "timeout": "1h", "start": True,
            "max_concurrent_downloads": min(bench.devices, 100_000)}  # fmt: skip
    if bench.shadow_every:
        # Every stage shadows first; the MQTT-linked sample reports the agreement.
        # Only that sample can report, so a profile waits for it until the stage timeout.
        body.update(shadow_every=bench.shadow_every, shadow_duration=bench.shadow_duration,
                    timeout=bench.shadow_timeout)
    resp = op.post(srv["url"] + "/api/v1/rollouts", timeout=600, json=body)
    ticks_before, seconds_before = tick_counters(srv["url"], srv["token"])
    resp.raise_for_status()
    rollout_id = resp.json()["id"]
    say(f"rollout {rollout_id}: release 2 to {bench.devices} devices in stages {STAGES}")
    state, stage = watch(bench, fleet, op, f"{srv['url']}/api/v1/rollouts/{rollout_id}")
    ticks_after, seconds_after = tick_counters(srv["url"], srv["token"])
    ticks = ticks_after - ticks_before
    report = fleet.report()
    say(f"end: {load_average()}")
    say(report.summary())
    if report.error_kinds:
        say(f"errors by kind: {report.error_kinds}")
    tick_ms = 1000 * (seconds_after - seconds_before) / ticks if ticks else float("nan")
    say(f"engine ticks by the server's scheduler: {ticks:.0f}, mean {tick_ms:.1f} ms")
    if state != "completed":
        say(f"the rollout did not complete within the run: it is {state} in stage {stage}/4")
    errors = report.errors + (0 if state == "completed" else 1)
    shadow = f" shadow_windows={report.shadow_windows}" if bench.shadow_every else ""
    return (
        f"devices={bench.devices} checkins_per_s={report.checkins_per_s:.1f} "
        f"p99_ms={report.checkin_p99_ms or float('nan'):.1f} errors={errors} "
        f"tick_ms={tick_ms:.1f}{shadow}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=65_000)
    p.add_argument("--db-url", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883", help="external broker")
    p.add_argument("--embedded-broker", action="store_true", help="use the server's own broker")
    p.add_argument("--mqtt-devices", type=int, default=300, help="MQTT-linked sample (gates)")
    p.add_argument("--poll", type=float, default=60.0, help="check-in interval the server sets")
    p.add_argument("--tick", type=float, default=1.0, help="rollout scheduler interval (s)")
    p.add_argument("--soak", default="5s", help="per-stage soak, compressed")
    p.add_argument("--window", type=float, default=10.0, help="telemetry window (s)")
    p.add_argument("--connections", type=int, default=32, help="simulator HTTP connections")
    p.add_argument("--max-minutes", type=float, default=90.0, help="stop the rollout after this")
    p.add_argument("--shadow-every", type=int, default=0, help="shadow 1 frame in N per stage")
    p.add_argument("--shadow-duration", default="10s", help="shortest shadow phase per stage")
    p.add_argument("--shadow-timeout", default="2m", help="stage timeout when shadowing")
    args = p.parse_args(argv)
    if not 1 <= args.devices <= 100_000:
        p.error("--devices must be within 1..100000")
    bench = Bench(
        devices=args.devices, db_url=args.db_url,
        mqtt_url=None if args.embedded_broker else args.mqtt_url,
        mqtt_devices=min(args.mqtt_devices, args.devices), poll_s=args.poll, tick_s=args.tick,
        soak=args.soak, window_s=args.window, connections=args.connections,
        max_minutes=args.max_minutes, shadow_every=args.shadow_every,
        shadow_duration=args.shadow_duration, shadow_timeout=args.shadow_timeout,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        last = run(bench, Path(tmp))
    print(last, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

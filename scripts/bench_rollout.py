#!/usr/bin/env python3
"""A 4-stage rollout over 65,000 simulated devices against the server on PostgreSQL.

    .venv/bin/python scripts/bench_rollout.py [--devices N] [--db-url URL] [--mqtt-url URL]

1. A fresh schema in PostgreSQL (127.0.0.1:5432, database ``test``), dropped at the end.
2. ``edgefleet-server run`` in its own process on 127.0.0.1 (PostgreSQL, Mosquitto or
   ``--embedded-broker``) with ``--workers`` HTTP processes (default 2), the rollout
   scheduler ticking every ``--tick`` seconds.
3. Releases 1 and 2 of the test model published over REST. The devices are created
   directly in the database with the server's own ``store.enroll_device`` and
   ``store.record_checkin`` (already on release 1): enrolling 65,000 devices over
   HTTP would measure enrollment. Everything after that goes over the wire.
4. The simulator (this process) runs every device: conditional check-ins over
   HTTP (If-None-Match), update events over HTTP (and MQTT for the linked
   sample), telemetry windows over MQTT for ``--mqtt-devices`` devices spread over
   the fleet (the gates' sample). Each device, for each update, refreshes its TUF
   metadata and downloads its own delta over HTTP and reports the bytes. Where from:
   with nginx installed (``--static auto``, the default), a private nginx on a free
   loopback port (its own config under the run's directory, started and stopped
   by the bench) serves the server's repository directory, and the server runs
   with ``--targets-url`` pointing at it, as a deployment behind a CDN would;
   ``--static server`` serves /tuf/ from the server, ``--artifacts-url`` names
   another static host.
5. Push mode (the default): the server pushes ``checkin`` commands at ``--push-rate``
   per second and advertises a long fallback poll (900 s unless ``--poll-interval``).
   The linked sample hears its commands on its own MQTT session; the rest of the
   fleet through one shared relay subscription to every ``cmd`` topic (an external
   broker that lets it read them, e.g. an anonymous Mosquitto; with
   ``--embedded-broker`` every device gets its own session instead). ``--poll``
   turns pushes off: devices poll every ``--poll-interval`` (default 60) seconds.
6. ``--steady`` seconds of steady state are measured first, then a rollout of
   release 2 to every device, stages 1%,10%,50%,100%, soak ``--soak``.
   The mean engine tick comes from the scheduler's ``edgefleet_rollout_tick*`` counters
   on ``/metrics`` (with ``--workers`` > 1, from the decisions' ``tick_ms`` seen while
   watching). Telemetry windows are ``--window`` (5) s, compressed like the soak: the
   gates want 3 windows a device on the new release before a stage may pass.
7. Without autovacuum on the server (as here), the bench vacuums and analyzes its own
   schema at autovacuum's default thresholds: the planner needs the bulk load's statistics.

Loopback only; bounded by ``--max-minutes``. The last line is exactly
``devices=N checkins_per_s=X p99_ms=Y errors=E tick_ms=T p99_steady_ms=S
p99_rollout_ms=R fleet_updated_s=F``: check-ins per second and their p99 over the
rollout, every error the simulated devices met (plus one if the rollout did not
complete within the run), the mean engine tick, the check-in p99 in the steady
phase and during the rollout, and the seconds from the rollout's creation until
every device had reported the new release (nan if some never did). With
``--shadow-every N`` every stage first shadows the candidate (the linked sample
reports agreement) and ``shadow_windows=W`` is appended.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
from bench_server import (  # noqa: E402
    autovacuum_on,
    fresh_schema,
    load_average,
    mean_tick_ms,
    publish,
    server_process,
    static_host,
    tick_counters,
    vacuum_like_autovacuum,
)

from agent.protocol.api import DesiredTarget, InstalledModel, MqttCredentials  # noqa: E402
from agent.protocol.manifest import model_target_path  # noqa: E402
from server.config import parse_mqtt_url  # noqa: E402
from server.db.tables import Database  # noqa: E402
from server.simulator import Fleet, FleetThread, SimConfig, WindowSpec, build_behaviour  # noqa: E402
from server.simulator.provision import provision  # noqa: E402

STAGES = "1%,10%,50%,100%"
_VACUUM_EVERY_S = 15.0  # autovacuum's naptime is 60 s; its workers then run for a while


@dataclass(frozen=True)
class Bench:
    devices: int
    db_url: str
    mqtt_url: str | None
    mqtt_devices: int
    poll_s: float  # 0: the server's default (900 s while pushing)
    push_rate: float  # 0: poll mode
    tick_s: float
    soak: str
    window_s: float
    connections: int
    max_minutes: float
    shadow_every: int = 0  # 0: no shadow phase
    shadow_duration: str = "10s"
    shadow_timeout: str = "2m"
    status_every_s: float = 5.0
    steady_s: float = 30.0
    download_connections: int = 16
    artifacts_url: str | None = None
    nginx: str | None = None  # serve /tuf/ from a private nginx (the server's --targets-url)
    workers: int = 1  # the server's HTTP processes
    vacuum: bool = False  # stand in for autovacuum on this run's schema (a server without it)

    @property
    def push(self) -> bool:
        return self.push_rate > 0

    @property
    def interval_s(self) -> float:
        """The poll interval the devices will be told."""
        return self.poll_s or (900.0 if self.push else 30.0)


def say(text: str) -> None:
    print(text, flush=True)


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


def run(bench: Bench, work: Path) -> str:
    say(f"start: {load_average()}")
    if bench.nginx:  # the server's repository directory, served as the deployment's CDN
        with static_host(work / "repo", work / "nginx", bench.nginx) as static:
            say(f"TUF metadata and targets from nginx at {static} (the server's --targets-url)")
            return serve(replace(bench, artifacts_url=static), work, targets_url=static)
    return serve(bench, work, targets_url=None)


def serve(bench: Bench, work: Path, targets_url: str | None) -> str:
    kw: dict[str, Any] = {"poll_s": bench.poll_s, "push_rate": bench.push_rate,
                          "mqtt_url": bench.mqtt_url, "tick_s": bench.tick_s,
                          "targets_url": targets_url, "workers": bench.workers}  # fmt: skip
    with fresh_schema(bench.db_url) as db_url, server_process(db_url, work, **kw) as srv:
        say(
            f"server pid {srv['pid']} at {srv['url']} on PostgreSQL "
            f"({'MQTT ' + bench.mqtt_url if bench.mqtt_url else 'embedded broker'})"
        )
        published = publish(srv["url"], srv["token"])
        r1 = published[1]
        stores = max(1, bench.devices // 20)  # 20 cameras a store, 20 regions
        mqtt = broker_for_devices(bench, srv["url"], srv["enroll"])
        linked, relay = bench.mqtt_devices, None
        if bench.push and bench.mqtt_url:  # one shared subscription for the other devices
            relay = MqttCredentials(mqtt.host, mqtt.port, "", "", mqtt.tls)
        elif bench.push:  # the embedded broker lets no device read others' commands
            linked = bench.devices
            say(f"embedded broker: all {linked} devices get their own MQTT session for pushes")
        config = SimConfig(
            devices=bench.devices,
            prefix="bench",
            stores=stores,
            regions=min(20, stores),
            http_connections=bench.connections,
            download_connections=bench.download_connections,
            artifacts_url=bench.artifacts_url,
            mqtt_devices=linked,
            relay=relay,
            first_checkin_s=bench.interval_s,  # already running: check-ins spread evenly
            telemetry=WindowSpec(window_s=bench.window_s),
            poll_s=None,
        )
        behaviour = build_behaviour(seed=1)
        db = Database(db_url)
        installed = InstalledModel("digits", 1, "int8-cpu", r1["sha256"], "a")
        started = time.perf_counter()
        fleet_plan = Fleet(srv["url"], config, behaviour, work / "cache").plan
        creds = provision(db, fleet_plan, mqtt, installed, batch=2000, progress=progress)
        say(
            f"{len(creds)} devices created directly in the database with the server's store "
            f"functions in {time.perf_counter() - started:.1f} s (no HTTP enrollment); "
            "all traffic from here on is HTTP/MQTT"
        )
        if not autovacuum_on(db_url):  # the planner needs statistics of the bulk load
            bench = replace(bench, vacuum=True)
            tables = vacuum_like_autovacuum(db_url, analyze_all=True)
            say(f"PostgreSQL runs without autovacuum: the bench stands in for it on its "
                f"schema ({len(tables)} tables analyzed after the load)")  # fmt: skip
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


def watch(
    bench: Bench, fleet: FleetThread, op: requests.Session, srv: dict[str, Any], rollout_id: str
) -> tuple[str, int, list[float]]:
    """Print each change of the rollout until it stops running, the time is up or Ctrl-C."""
    end = time.monotonic() + bench.max_minutes * 60
    state, stage, last_line = "running", 1, ""
    url, ticks = f"{srv['url']}/api/v1/rollouts/{rollout_id}", []  # tick_ms at each look
    vacuumed = time.monotonic()
    try:
        while time.monotonic() < end:
            detail = op.get(url, timeout=120).json()
            state, stage = detail["state"], detail["stage"]
            tick = (detail.get("decision") or {}).get("tick_ms")
            if isinstance(tick, (int, float)):
                ticks.append(float(tick))
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
            if bench.vacuum and time.monotonic() - vacuumed > _VACUUM_EVERY_S:
                vacuum_like_autovacuum(srv["db_url"])
                vacuumed = time.monotonic()
            time.sleep(bench.status_every_s)
    except KeyboardInterrupt:  # Ctrl-C: stop here and still report what was measured
        say("interrupted")
    return state, stage, ticks


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
    say(f"steady state for {bench.steady_s:.0f} s ({'push' if bench.push else 'poll'} mode, "
        f"poll interval {bench.interval_s:.0f} s)")  # fmt: skip
    time.sleep(bench.steady_s)
    steady = fleet.report()
    say(f"steady: {steady.checkins_per_s:.1f} check-ins/s, p99 {steady.checkin_p99_ms} ms, "
        f"{steady.not_modified} not modified, {steady.errors} errors")  # fmt: skip
    fleet.call(start_rollout_phase)
    body = {"release": "digits@2", "select": ["fleet=bench"], "stages": STAGES,
            "soak": bench.soak, "timeout": "1h", "start": True,
            "max_concurrent_downloads": min(bench.devices, 100_000)}  # fmt: skip
    if bench.shadow_every:
        # Every stage shadows first; the MQTT-linked sample reports the agreement.
        # Only that sample can report, so a profile waits for it until the stage timeout.
        body.update(
            shadow_every=bench.shadow_every,
            shadow_duration=bench.shadow_duration,
            timeout=bench.shadow_timeout,
        )
    created = time.monotonic()
    resp = op.post(srv["url"] + "/api/v1/rollouts", timeout=600, json=body)
    ticks_before, seconds_before = tick_counters(srv["url"], srv["token"])
    resp.raise_for_status()
    rollout_id = resp.json()["id"]
    if bench.vacuum:  # its device rows were just written: as autovacuum's analyze would
        vacuum_like_autovacuum(srv["db_url"])
    say(f"rollout {rollout_id}: release 2 to {bench.devices} devices in stages {STAGES}")
    state, stage, sampled = watch(bench, fleet, op, srv, rollout_id)
    steady_p99 = steady.checkin_p99_by_phase_ms.get("steady")
    updated_s = fleet_updated(bench, fleet, created)
    tick_ms, how = mean_tick_ms(srv["url"], srv["token"], (ticks_before, seconds_before), sampled)
    say(how)
    report = fleet.report()
    say(f"end: {load_average()}")
    say(report.summary())
    if report.error_kinds:
        say(f"errors by kind: {report.error_kinds}")
    if state != "completed":
        say(f"the rollout did not complete within the run: it is {state} in stage {stage}/4")
    errors = report.errors + (0 if state == "completed" else 1)
    shadow = f" shadow_windows={report.shadow_windows}" if bench.shadow_every else ""
    rollout_p99 = report.checkin_p99_by_phase_ms.get("rollout")
    nan = float("nan")
    return (
        f"devices={bench.devices} checkins_per_s={report.checkins_per_s:.1f} "
        f"p99_ms={report.checkin_p99_ms or nan:.1f} errors={errors} "
        f"tick_ms={tick_ms:.1f} p99_steady_ms={steady_p99 or nan:.1f} "
        f"p99_rollout_ms={rollout_p99 or nan:.1f} "
        f"fleet_updated_s={updated_s:.1f}{shadow}"
    )


def start_rollout_phase(fleet: Fleet) -> None:
    fleet.stats.reset_checkins()
    fleet.stats.set_phase("rollout")


def fleet_updated(bench: Bench, fleet: FleetThread, created: float) -> float:
    """Seconds from the rollout's creation until the last device reported release 2."""
    deadline = time.monotonic() + 30  # the rollout may complete before the last report
    while True:
        on_new = fleet.report().releases.get("digits@2", 0)
        if on_new == bench.devices or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    last = fleet.call(lambda f: f.stats.last_commit_at)
    if on_new != bench.devices or last is None:
        say(f"only {on_new} of {bench.devices} devices run release 2")
        return float("nan")
    return last - created


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=65_000)
    p.add_argument("--db-url", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883", help="external broker")
    p.add_argument("--embedded-broker", action="store_true", help="use the server's own broker")
    p.add_argument("--mqtt-devices", type=int, default=300, help="MQTT-linked sample (gates)")
    p.add_argument("--poll", action="store_true", help="no pushes: devices poll (old mode)")
    p.add_argument("--poll-interval", type=float, default=0.0,
                   help="check-in interval (default 900 s push, 60 poll)")  # fmt: skip
    p.add_argument("--push-rate", type=float, default=250.0, help="pushes per second")
    p.add_argument("--steady", type=float, default=30.0, help="steady-state seconds measured")
    p.add_argument("--artifacts-url", help="static host with /tuf/ (default: the server)")
    p.add_argument(
        "--static",
        choices=("nginx", "server", "auto"),
        default="auto",
        help="who serves /tuf/: a private nginx on loopback (the server's --targets-url) or "
        "the server itself; auto: nginx when installed and no --artifacts-url is given",
    )
    p.add_argument("--download-connections", type=int, default=16,
                   help="simulator connections for metadata and targets")  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="the server's HTTP processes")
    p.add_argument("--tick", type=float, default=1.0, help="rollout scheduler interval (s)")
    p.add_argument("--soak", default="5s", help="per-stage soak, compressed")
    p.add_argument(
        "--window", type=float, default=5.0, help="telemetry window (s), compressed like the soak"
    )
    p.add_argument("--connections", type=int, default=16, help="simulator HTTP connections")
    p.add_argument("--max-minutes", type=float, default=90.0, help="stop the rollout after this")
    p.add_argument("--shadow-every", type=int, default=0, help="shadow 1 frame in N per stage")
    p.add_argument("--shadow-duration", default="10s", help="shortest shadow phase per stage")
    p.add_argument("--shadow-timeout", default="2m", help="stage timeout when shadowing")
    args = p.parse_args(argv)
    if not 1 <= args.devices <= 100_000:
        p.error("--devices must be within 1..100000")
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if args.static == "nginx" and not nginx:
        p.error("--static nginx: no nginx installed (apt-get install -y nginx-light)")
    use_nginx = args.static == "nginx" or (
        args.static == "auto" and nginx is not None and not args.artifacts_url
    )
    bench = Bench(
        devices=args.devices, db_url=args.db_url,
        mqtt_url=None if args.embedded_broker else args.mqtt_url,
        mqtt_devices=min(args.mqtt_devices, args.devices), tick_s=args.tick,
        poll_s=args.poll_interval or (60.0 if args.poll else 0.0),
        push_rate=0.0 if args.poll else args.push_rate, steady_s=args.steady,
        artifacts_url=args.artifacts_url, download_connections=args.download_connections,
        nginx=nginx if use_nginx else None, workers=args.workers,
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

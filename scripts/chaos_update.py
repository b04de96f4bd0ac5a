"""Chaos test of the update path: SIGKILL a real agent mid-update, again and again.

    python scripts/chaos_update.py --kills 200 [--seed S] [--workdir DIR] [-v]

Runs a real fleet server (in this process: SQLite, a private Mosquitto
broker), publishes releases that alternate between two model fixtures (so
updates go as deltas, and in full where the server has no delta from the
running model), and runs ``edgefleet-agent run`` as a subprocess behind a
loopback TCP proxy. Each cycle assigns the next release and SIGKILLs the agent
at a random moment, then checks on disk that the active model is a complete,
published target (sha256 of the file, and of its slot manifest), restarts the
agent and waits for it to come up and check in (its sd_notify STATUS line, on
our own NOTIFY_SOCKET). A restart that does not check in within the timeout,
an agent that exits on its own, or an update record with more than
MAX_RESTARTS restarts counts as a crash loop.

Once each per run (spread over the cycles): a full disk during install (a
small tmpfs mounted over the slots; if ``mount`` is refused, RLIMIT_FSIZE on
the agent, which fails the download instead), the network cut mid-download
(the proxy throttles, then drops every connection), a server restart
mid-rollout, a broker restart, and clock skew (libfaketime, +2 days: the TUF
metadata looks expired; skipped when libfaketime is absent).

The last line is exactly ``kills=N verified=N partial=0 crashloops=0``.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from chaos_rig import (  # noqa: E402 - scripts/ is on the path when run as a script
    AgentProc,
    Broker,
    Proxy,
    SmallDisk,
    disk_problem,
    free_port,
    log,
    record,
)

from agent.cli import main as agent_main  # noqa: E402
from agent.update.state_machine import MAX_RESTARTS  # noqa: E402
from server.app import ServerHandle, start_server  # noqa: E402
from server.config import ServerConfig  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
BOARD = REPO / "tests" / "boards" / "x86-gateway"
# Release r ships MODELS[r - 1]: distinct files, so r -> r+1 goes as a delta and 3 -> 1 in full
# (release 1 was published first: no delta leads to it).
MODELS = ("digits_int8_r1.tflite", "digits_int8_r2.tflite", "digits_int8_meta.tflite")
FAKETIME_LIB = next(iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))), None)
DOWN = ("disk_full", "clock_skew")  # assigned while the agent is down: its restart updates
SCENARIOS = ("disk_full", "net_cut", "server_restart", "broker_restart", "clock_skew")


class Operator:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        for attempt in range(30):  # the server may be restarting
            try:
                resp = self.session.request(method, self.url + path, timeout=30, **kwargs)
            except requests.ConnectionError:
                time.sleep(0.5 + attempt * 0.1)
                continue
            if resp.status_code >= 400:
                raise RuntimeError(f"{method} {path}: {resp.status_code} {resp.text[:300]}")
            return resp.json()
        raise RuntimeError(f"{method} {path}: server unreachable")

    def publish(self, release: int) -> Any:
        path = FIXTURES / MODELS[release - 1]
        with open(path, "rb") as model:
            labels = ",".join(str(i) for i in range(10))
            data = {"name": "digits", "release": str(release), "variant": "int8-cpu",
                    "labels": labels, "input_range": "0,1"}  # fmt: skip
            return self.call(
                "POST", "/api/v1/models", files={"file": (path.name, model)}, data=data
            )

    def assign(self, release: int) -> None:
        self.call("POST", "/api/v1/assignments", json={"name": "digits", "release": release,
                                                       "tag": "fleet=chaos"})  # fmt: skip


def enroll(server_url: str, token: str, root: Path, work: Path) -> Path:
    config = work / "agent.toml"
    config.write_text(
        f'[agent]\nstate_dir = "{work / "state"}"\nhw_root = "{BOARD}"\nlog_level = "info"\n'
        "[inference]\nnum_threads = 1\nmax_fps = 30\n"
        "[telemetry]\nwindow_s = 1\nwarmup_inferences = 2\n"
        "[update]\npoll_interval_s = 1\nhealth_inferences = 5\ndownload_backoff_s = 0.2\n"
    )
    argv = ["enroll", "--server", server_url, "--token", token, "--config", str(config),
            "--root", str(root), "--hardware-id", "hw-chaos", "--tag", "fleet=chaos"]  # fmt: skip
    if agent_main(argv) != 0:
        raise RuntimeError("enrollment failed")
    return config


@dataclass
class Tally:
    kills: int = 0
    verified: int = 0
    partial: int = 0
    crashloops: int = 0


class Chaos:
    """The rig (broker, server, proxy, agent) and one kill cycle at a time."""

    def __init__(self, work: Path, seed: int, stack: contextlib.ExitStack) -> None:
        self.rng = random.Random(seed)  # noqa: S311 - reproducible chaos, not secrets
        self.work, self.state = work, work / "state"
        self.broker = Broker(work / "broker")
        self.broker.start()
        stack.callback(self.broker.stop)
        self.cfg = ServerConfig(
            data_dir=work / "server", port=free_port(),
            mqtt_url=f"mqtt://127.0.0.1:{self.broker.port}",
            operator_token="op-" + secrets.token_urlsafe(24),
            enrollment_tokens=("enroll-" + secrets.token_urlsafe(16),), poll_interval_s=1.0,
            ingest_client_id="chaos-ingest-" + secrets.token_hex(4), log_level="warning",
        )  # fmt: skip
        self.srv: ServerHandle = start_server(self.cfg)
        stack.callback(self._stop_server)
        self.proxy = Proxy(self.cfg.port)
        stack.callback(self.proxy.close)
        self.op = Operator(self.srv.url, self.srv.operator_token)
        self.published = {self.op.publish(r)["sha256"] for r in range(1, len(MODELS) + 1)}
        root = self.srv.repo.metadata_dir / "1.root.json"
        config = enroll(self.proxy.url, self.cfg.enrollment_tokens[0], root, work)
        self.agent = AgentProc(config, work)
        stack.callback(self.agent.stop)
        self.small_disk = SmallDisk(self.state / "slots")
        stack.callback(self._restore_disk)
        self.tally = Tally()
        self.release = 1

    def _stop_server(self) -> None:
        self.srv.stop()  # whichever server runs now: it is replaced on a restart

    def _restore_disk(self) -> None:
        if self.small_disk.mounted:
            self.small_disk.unmount()

    def first_install(self) -> None:
        self.op.assign(1)
        self.agent.start()
        if not self.agent.wait_checkin() or disk_problem(self.state, self.published):
            raise RuntimeError(f"the agent did not install release 1 (see {self.work}/agent.log)")

    def during_update(self, scenario: str | None) -> None:
        """Assign the next release and disturb the rollout, as ``scenario`` says."""
        self.release = self.release % len(MODELS) + 1
        if scenario not in DOWN:
            self.op.assign(self.release)
        if scenario == "net_cut":
            self.proxy.rate_bps = 4096  # slow enough that the cut lands mid-transfer
            time.sleep(self.rng.uniform(0.5, 2.5))
            self.proxy.cut()
            time.sleep(2.0)
            self.proxy.restore()
            self.proxy.rate_bps = 0
        elif scenario == "server_restart":
            time.sleep(self.rng.uniform(0.0, 1.0))
            self.srv.stop()
            time.sleep(1.0)
            self.srv = start_server(self.cfg)
        elif scenario == "broker_restart":
            time.sleep(self.rng.uniform(0.0, 1.0))
            self.broker.stop()
            time.sleep(1.0)
            self.broker.start()
        time.sleep(self.rng.uniform(0.0, 2.5))

    def cycle(self, n: int, scenario: str | None) -> None:
        self.during_update(scenario)
        if not self.agent.kill():
            self.tally.crashloops += 1
            log(f"cycle {n}: the agent had exited on its own")
        self.tally.kills += 1
        problems = [p for p in (disk_problem(self.state, self.published),) if p]
        if self.small_disk.mounted:
            self.small_disk.unmount()
        env: dict[str, str] = {}
        fsize = None
        if scenario == "disk_full":
            if not self.small_disk.mount():
                fsize = 30_000  # mount refused here: the download's writes fail instead
        elif scenario == "clock_skew" and FAKETIME_LIB is not None:
            env = {"LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": "+2d",
                   "FAKETIME_DONT_FAKE_MONOTONIC": "1"}  # fmt: skip
        if scenario in DOWN:
            self.op.assign(self.release)  # the restarted agent meets the fault while updating
        self.agent.start(env, fsize)
        came_up = self.agent.wait_checkin()
        update = record(self.state, "update.json")
        problems += [p for p in (disk_problem(self.state, self.published),) if p]
        if scenario:
            how = " (tmpfs)" if self.small_disk.mounted else " (RLIMIT_FSIZE)" if fsize else ""
            skew = "" if scenario != "clock_skew" or env else " (skipped: no libfaketime)"
            failures = record(self.state, "failures.json")
            log(f"cycle {n}: {scenario}{how}{skew}: checked in={came_up}, "
                f"failures={failures}, reason={update.get('reason')!r}")  # fmt: skip
        disk_full = self.small_disk.mounted
        if problems:
            self.tally.partial += 1
            log(f"cycle {n}: PARTIAL: {problems}")
        elif came_up:
            self.tally.verified += 1
        restarts = int(update.get("restarts", 0))
        if not came_up or restarts > MAX_RESTARTS:
            self.tally.crashloops += 1
            log(f"cycle {n}: CRASH LOOP: checked in={came_up}, restarts={restarts}")
        if not came_up or env or fsize is not None or disk_full:  # the fault lasts one run
            self.agent.stop()  # a clean stop: not one of the kills
            self._restore_disk()
            self.agent.start()
            self.agent.wait_checkin()

    def bandwidth(self) -> str:
        fleet = self.op.call("GET", "/api/v1/bandwidth")["fleet"]
        return (f"updates={fleet['updates']} deltas={fleet['deltas']} "
                f"fallbacks={fleet['fallbacks']}")  # fmt: skip


def run(kills: int, seed: int, work: Path) -> Tally:
    with contextlib.ExitStack() as stack:
        chaos = Chaos(work, seed, stack)
        chaos.first_install()
        at = {round(k * kills / len(SCENARIOS)): s for k, s in enumerate(SCENARIOS)}
        for n in range(kills):
            chaos.cycle(n, at.get(n))
        log(chaos.bandwidth())
        return chaos.tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", help="kept afterwards (default: a temporary directory)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
        tally = run(args.kills, args.seed, work)
    else:
        with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
            tally = run(args.kills, args.seed, Path(tmp))
    log(f"{time.monotonic() - started:.0f}s for {args.kills} kills")
    t = tally
    print(f"kills={t.kills} verified={t.verified} partial={t.partial} crashloops={t.crashloops}")
    return 0 if (t.verified, t.partial, t.crashloops) == (t.kills, 0, 0) else 1


if __name__ == "__main__":
    sys.exit(main())

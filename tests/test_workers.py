"""``edgefleet-server run --workers N``: N HTTP processes, background services once.

The real command runs as a subprocess on PostgreSQL with the embedded broker. The
test sees the process tree through psutil: which process holds which connection.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from fleet_helpers import FIXTURES, Operator

from agent.protocol.api import CHECKIN_PATH, ENROLL_PATH, checkin_body
from server.main import main as server_main

ENROLL_TOKEN = "workers-test-enrollment-token"  # noqa: S105 - a test value
API_LINE = re.compile(r"API (http://127\.0\.0\.1:(\d+)) ")
WORKER_LINE = re.compile(r"HTTP worker (\d+) started \(pid (\d+)\)")
PG_PORT = 5432


@dataclass
class Running:
    proc: subprocess.Popen[str]
    data: Path
    url: str = ""
    port: int = 0
    log: list[str] = field(default_factory=list)
    lines: queue.Queue[str] = field(default_factory=queue.Queue)

    def wait_for(self, pattern: re.Pattern[str], timeout_s: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            self.log.append(line)
            if match := pattern.search(line):
                return match

    def drain(self) -> str:
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return "".join(self.log)

    def workers(self) -> list[psutil.Process]:
        """The live HTTP workers: children listening on the API port."""
        out = []
        for child in psutil.Process(self.proc.pid).children():
            conns = child.net_connections("tcp")
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in conns):
                out.append(child)
        return out


@pytest.fixture
def server(tmp_path: Path, pg_url: str) -> Iterator[Running]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    argv = [sys.executable, "-m", "server.main", "run", "--data", str(tmp_path), "--port", "0",
            "--workers", "2", "--db-url", pg_url, "--enrollment-token", ENROLL_TOKEN,
            "--checkin-rate", "0", "--enroll-rate", "0", "--http-threads", "4"]  # fmt: skip
    # Its own process group, as under systemd, so a test can signal the whole group.
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=env, start_new_session=True)  # fmt: skip
    run = Running(proc, tmp_path)
    assert proc.stderr is not None
    stderr = proc.stderr

    def pump() -> None:
        for line in stderr:
            run.lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        match = run.wait_for(API_LINE)
        run.url, run.port = match.group(1), int(match.group(2))
        yield run
    finally:
        if proc.poll() is None:
            kids = psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
            for kid in kids:
                with contextlib.suppress(psutil.NoSuchProcess):
                    kid.kill()
            proc.wait()


def _enroll(url: str, n: int) -> list[tuple[str, str]]:
    devices = []
    for i in range(n):
        body = {"token": ENROLL_TOKEN, "hardware_id": f"hw-workers-{i}", "profile": "x86-gateway",
                "variant_preference": ["int8-cpu"], "agent_version": "0.1.0"}  # fmt: skip
        resp = requests.post(url + ENROLL_PATH, json=body, timeout=30)
        assert resp.status_code == 200, resp.text
        devices.append((resp.json()["device_id"], resp.json()["device_token"]))
    return devices


def _checkins(url: str, device: tuple[str, str], times: int) -> list[Any]:
    """``times`` check-ins on one keep-alive connection; the answers' desired targets."""
    device_id, token = device
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {token}"
        out = []
        for _ in range(times):
            resp = session.post(url + CHECKIN_PATH.format(device_id=device_id),
                                json=checkin_body("idle", None, "0.1.0"), timeout=30)  # fmt: skip
            assert resp.status_code == 200, resp.text
            out.append(resp.json()["desired"])
        return out


def _post_release(operator: Operator, release: int) -> int:
    model = FIXTURES / f"digits_int8_r{release}.tflite"
    with requests.Session() as session, open(model, "rb") as body:
        session.headers.update(operator.session.headers)
        resp = session.post(operator.url + "/api/v1/models", files={"file": (model.name, body)},
                            data={"name": "digits", "release": str(release),
                                  "variant": "int8-cpu", "labels": ",".join(map(str, range(10))),
                                  "input_range": "0,1"}, timeout=120)  # fmt: skip
        return resp.status_code


def _serving_pids(run: Running, most: int) -> set[int]:
    """Open keep-alive connections (up to ``most``) until each worker holds one."""
    held: list[requests.Session] = []
    pids: set[int] = set()
    workers = run.workers()
    try:
        while len(held) < most and len(pids) < len(workers):
            held.append(requests.Session())
            assert held[-1].get(run.url + "/healthz", timeout=30).status_code == 200
            for worker in workers:
                conns = worker.net_connections("tcp")
                if any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == run.port
                       for c in conns):  # fmt: skip
                    pids.add(worker.pid)
        return pids
    finally:
        for session in held:
            session.close()


def test_workers_serve_the_api_and_services_run_once(server: Running) -> None:
    workers = server.workers()
    assert len(workers) == 2
    parent = psutil.Process(server.proc.pid)
    # The parent only supervises: it accepts no HTTP connection itself.
    assert len(_serving_pids(server, 64)) == 2

    devices = _enroll(server.url, 6)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda d: _checkins(server.url, d, 30), devices))
    assert all(a is None for batch in answers for a in batch)  # 180 check-ins, nothing to run

    # Publish through one worker; every check-in, whichever worker answers, sees it.
    operator = Operator(server.url, (server.data / "operator.token").read_text().strip())
    operator.publish(1)
    operator.assign(1, device=devices[0][0])
    with ThreadPoolExecutor(4) as pool:
        seen = [a for batch in pool.map(lambda _: _checkins(server.url, devices[0], 10), range(4))
                for a in batch]  # fmt: skip
    assert len(seen) == 40 and all(a is not None and a["release"] == 1 for a in seen)

    # The same release sent four times at once, over connections the workers share:
    # exactly one publishes, the others are told it exists (no 500, nothing half-done).
    with ThreadPoolExecutor(4) as pool:
        codes = sorted(pool.map(lambda _: _post_release(operator, 2), range(4)))
    assert codes in ([201, 409, 409, 409], [200, 409, 409, 409]), codes

    # Background services are the parent's: workers talk to nobody but clients and PostgreSQL.
    for worker in server.workers():
        for conn in worker.net_connections("tcp"):
            assert conn.laddr.port == server.port or (conn.raddr and conn.raddr.port == PG_PORT), (
                f"worker {worker.pid} holds {conn}"
            )
    assert not any(c.laddr.port == server.port for c in parent.net_connections("tcp")
                   if c.status == psutil.CONN_ESTABLISHED)  # fmt: skip
    text = server.drain()
    assert text.count("ingest subscribed to") == 1
    assert text.count("rollout scheduler in process") == 1

    # A worker that crashes is replaced; the API keeps answering meanwhile.
    victim = workers[0].pid
    os.kill(victim, signal.SIGKILL)
    assert _checkins(server.url, devices[1], 10) == [None] * 10
    server.wait_for(re.compile(rf"HTTP worker \d+ \(pid {victim}\) died"), timeout_s=30)
    server.wait_for(WORKER_LINE, timeout_s=30)
    deadline = time.monotonic() + 60
    while len(server.workers()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(server.workers()) == 2 and victim not in {w.pid for w in server.workers()}

    server.proc.send_signal(signal.SIGTERM)
    assert _stopped(server) == 0
    assert not [p for p in workers[1:] if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _stopped(server: Running, timeout_s: float = 120) -> int:
    """The server's exit code after a stop request; on a hang, what it last logged."""
    try:
        return server.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit {timeout_s:.0f} s after SIGTERM; last log:\n{server.drain()[-4000:]}")


def test_sigterm_to_the_whole_process_group_stops_the_server(server: Running) -> None:
    """systemd's KillMode=control-group signals every process of the unit at once: the
    rollout scheduler and the HTTP workers too, not only the server."""
    assert len(server.workers()) == 2
    os.killpg(server.proc.pid, signal.SIGTERM)
    assert _stopped(server) == 0


def test_workers_on_sqlite_are_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert server_main(["run", "--data", str(tmp_path), "--port", "0", "--workers", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "PostgreSQL" in err
    assert not (tmp_path / "keys").exists()  # refused before anything started

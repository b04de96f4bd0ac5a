"""Two real ``edgefleet-server run`` processes on one PostgreSQL schema run one rollout.

Both schedulers tick every 50 ms; devices check in and report to either
process. Whatever the interleaving, no device may get two assignments from
the rollout and the stage index must go 0, 1, 2, 3 exactly once each.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import pytest
import requests
from rollout_helpers import Fleet
from sqlalchemy import func, select
from waiting import wait_for

from agent.protocol.api import InstalledModel, checkin_body
from agent.protocol.manifest import model_target_path
from server.db import queries
from server.db.tables import Assignment, Database
from server.rollout.service import RolloutDevice, RolloutHistory

DEVICES = 300
SERVER_BIN = Path(sys.executable).parent / "edgefleet-server"
_URL = re.compile(r"API (http://\S+) \(OpenAPI")


class ServerProcess:
    """``edgefleet-server run`` in a subprocess; its log goes to a file we read the URL from."""

    def __init__(self, name: str, data: Path, db_url: str, enroll_token: str,
                 env: dict[str, str]) -> None:
        self.log_path = data.parent / f"server-{name}.log"
        self.argv = [
            str(SERVER_BIN), "run", "--data", str(data), "--port", "0", "--db-url", db_url,
            "--enrollment-token", enroll_token, "--log-level", "info",
            "--ingest-client-id", f"ef-mp-{name}-{secrets.token_hex(4)}",
        ]
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None
        self.url = ""

    def start(self) -> ServerProcess:
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=self.env)

        def started() -> str | None:
            assert self.proc is not None and self.proc.poll() is None, self.log_text()
            match = _URL.search(self.log_text())
            return match.group(1) if match else None

        self.url = wait_for(f"server {self.argv[-1]} to start", started, 60)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.log is not None:
            self.log.close()


@pytest.fixture
def servers(pg_url: str, tmp_path: Path) -> Iterator[tuple[list[ServerProcess], str, str]]:
    token = "op-" + secrets.token_urlsafe(24)
    enroll_token = "enroll-" + secrets.token_urlsafe(16)
    env = {**os.environ, "EDGEFLEET_OPERATOR_TOKEN": token, "EDGEFLEET_ROLLOUT_TICK_S": "0.05"}
    data = tmp_path / "data"  # keys and TUF repository shared, as on one volume
    procs: list[ServerProcess] = []
    try:
        # One after the other: the first creates the keys, repository and tables.
        for name in ("a", "b"):
            procs.append(ServerProcess(name, data, pg_url, enroll_token, env).start())
        yield procs, token, enroll_token
    finally:
        for proc in procs:
            proc.stop()


def enroll_fleet(db: Database) -> list[tuple[str, str]]:
    with db.session() as s:
        creds = [
            queries.enroll_device(
                s, hardware_id=f"hw-mp-{i}", profile="rpi4", variant_preference=["int8-cpu"],
                tags={"fleet": "mp", "store": f"s{i % 30}", "region": f"r{i % 5}"},
                agent_version="0.1.0",
            )
            for i in range(DEVICES)
        ]
    return [(c.device_id, c.device_token) for c in creds]


class Devices:
    """Each simulated device checks in with one of the servers and installs what it is told."""

    def __init__(self, urls: list[str], creds: list[tuple[str, str]], sha256: str) -> None:
        self.urls, self.creds, self.sha256 = urls, creds, sha256
        self.installed: set[str] = set()
        self.errors: list[str] = []
        self.local = threading.local()

    def _post(self, url: str, device_id: str, token: str, path: str,
              body: dict[str, Any]) -> Any:
        session = getattr(self.local, "session", None) or requests.Session()
        self.local.session = session
        resp = session.post(f"{url}/api/v1/devices/{device_id}/{path}", json=body,
                            headers={"Authorization": f"Bearer {token}"}, timeout=30)
        if resp.status_code >= 300:
            self.errors.append(f"{path} {resp.status_code} {resp.text[:200]}")
        return resp.json()

    def step(self, index: int) -> None:
        device_id, token = self.creds[index]
        if device_id in self.installed:
            return
        url = self.urls[index % len(self.urls)]
        desired = self._post(url, device_id, token, "checkin", checkin_body("idle", None, "0.1"))
        if not desired.get("desired") or desired["desired"]["release"] != 2:
            return
        target = model_target_path("digits", 2, "int8-cpu")
        other = self.urls[(index + 1) % len(self.urls)]
        self._post(other, device_id, token, "events",
                   {"type": "update", "state": "commit", "detail": {"target": target}})
        model = InstalledModel("digits", 2, "int8-cpu", self.sha256, "b")
        self._post(url, device_id, token, "checkin", checkin_body("idle", model, "0.1"))
        self.installed.add(device_id)


@pytest.mark.production
def test_two_servers_on_one_database_never_double_assign(
    servers: tuple[list[ServerProcess], str, str], pg_url: str
) -> None:
    procs, token, _ = servers
    first, second = (Fleet(p.url, token, "") for p in procs)
    first.publish(2)
    db = Database(pg_url)
    try:
        creds = enroll_fleet(db)
        rid = second.create(release="digits@2", select=["fleet=mp"], stages="1%,10%,50%,100%",
                            soak="0s", max_concurrent_downloads=1000, start=True)["id"]
        devices = Devices([p.url for p in procs], creds, first.sha[2])
        deadline = time.monotonic() + 120
        with ThreadPoolExecutor(8) as pool:
            while first.rollout(rid)["state"] == "running":
                assert time.monotonic() < deadline, "the rollout did not complete in 120s"
                list(pool.map(devices.step, range(DEVICES)))
                time.sleep(0.05)
        assert devices.errors == []
        assert second.rollout(rid)["state"] == "completed"

        with db.session() as s:
            per_device = dict(s.execute(
                select(Assignment.target_value, func.count())
                .where(Assignment.rollout_id == rid).group_by(Assignment.target_value)
            ).all())
            moves = s.execute(
                select(RolloutHistory.trigger, RolloutHistory.from_stage, RolloutHistory.to_stage,
                       RolloutHistory.process)
                .where(RolloutHistory.rollout_id == rid).order_by(RolloutHistory.id)
            ).all()
            never_told = s.scalar(
                select(func.count()).select_from(RolloutDevice)
                .where(RolloutDevice.rollout_id == rid, RolloutDevice.started_at.is_(None))
            )
        assert len(per_device) == DEVICES and set(per_device.values()) == {1}
        assert [(t, a, b) for t, a, b, _ in moves] == [
            ("create", 0, 0), ("start", 0, 0), ("stage_passed", 0, 1), ("stage_passed", 1, 2),
            ("stage_passed", 2, 3), ("finished", 3, 3),
        ]
        assert never_told == 0
        engines = {p for t, _, _, p in moves if t in ("stage_passed", "finished")}
        print(f"stage transitions made by: {sorted(engines)}")
    finally:
        db.dispose()
    for proc in procs:
        assert proc.proc is not None and proc.proc.poll() is None, proc.log_text()[-2000:]

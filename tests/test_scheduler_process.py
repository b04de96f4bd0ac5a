"""The rollout scheduler in a process of its own, on PostgreSQL: it ticks rollouts, its
tick counters reach ``/metrics``, and it never outlives its server (stop or SIGKILL)."""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import requests
from rollout_helpers import published_fleet
from waiting import wait_for

from server.app import ServerHandle
from server.errors import ConfigError
from server.rollout.scheduler import SchedulerProcess

ServerFactory = Callable[..., ServerHandle]
ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.production


def metric(server: ServerHandle, name: str) -> float:
    headers = {"Authorization": f"Bearer {server.operator_token}"}
    text = requests.get(f"{server.url}/metrics", headers=headers, timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not on /metrics")


def test_a_rollout_completes_with_the_scheduler_in_its_own_process(
    server_factory: ServerFactory, tmp_path: Path, pg_url: str
) -> None:
    server = server_factory(tmp_path / "server", db_url=pg_url, rollout_tick_interval_s=0.2)
    scheduler = server.scheduler
    assert isinstance(scheduler, SchedulerProcess)
    child = scheduler.pid
    assert child is not None and psutil.pid_exists(child)
    f = published_fleet(server)
    devices = f.enroll(4, tags=lambda i: {"fleet": "test", "store": f"s{i}"})
    f.bring_to(devices, 1)
    rid = f.create(release="digits@2", select=["fleet=test"], stages="50%,100%", soak="0s",
                   start=True)["id"]

    def finished() -> bool | None:
        for dev in devices:
            if dev.installed != 2 and f.desired_release(dev) == 2:
                f.install(dev, 2)
        return f.rollout(rid)["state"] == "completed" or None

    wait_for("the rollout to complete", finished)
    assert metric(server, "edgefleet_rollout_ticks_total") >= 2
    assert metric(server, "edgefleet_rollout_tick_seconds_total") > 0
    server.stop()
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"


def test_the_scheduler_process_exits_when_its_server_is_killed(
    tmp_path: Path, pg_url: str
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.main", "run", "--data", str(tmp_path), "--port", "0",
         "--db-url", pg_url, "--rollout-scheduler", "process", "--log-level", "warning",
         "--ingest-client-id", f"kill-test-{secrets.token_hex(4)}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        server = psutil.Process(proc.pid)
        children = wait_for("the scheduler process", lambda: server.children() or None)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while any(c.is_running() and c.status() != "zombie" for c in children):
            assert time.monotonic() < deadline, "the scheduler outlived its killed server"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_scheduler_process_needs_postgresql(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="needs PostgreSQL"):
        server_factory(tmp_path / "server", rollout_scheduler="process")


@pytest.mark.parametrize(("override", "message"), [
    ({"rollout_scheduler": "cron"}, "rollout_scheduler must be auto, thread or process"),
    ({"http_threads": 0}, "http_threads must be within 1..256"),
    ({"http_threads": 1000}, "http_threads must be within 1..256"),
])  # fmt: skip
def test_bad_scheduler_and_thread_settings_are_clear_errors(
    server_factory: ServerFactory, tmp_path: Path, override: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        server_factory(tmp_path / "server", **override)

"""`edgefleet-server run` as a real process: starts, serves, stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from server import __version__
from server.app import start_server
from server.config import ServerConfig
from server.errors import ConfigError

API_LINE = re.compile(r"API (http://127\.0\.0\.1:\d+) ")


def test_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "server.main", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"edgefleet-server {__version__}"


def test_run_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_OPERATOR_TOKEN"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.main", "run", "--data", str(tmp_path), "--port", "0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stderr is not None
    stderr = proc.stderr

    def pump() -> None:
        for line in stderr:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        url = None
        while url is None:
            line = lines.get(timeout=60)
            match = API_LINE.search(line)
            url = match.group(1) if match else None
        token_file = tmp_path / "operator.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert requests.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"
        resp = requests.get(
            f"{url}/api/v1/devices", headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        assert resp.status_code == 200 and resp.json() == []
        assert requests.get(f"{url}/docs", timeout=10).status_code == 200
        assert (tmp_path / "keys" / "root.pem").exists()
        assert (tmp_path / "repo" / "metadata" / "timestamp.json").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_configuration_is_one_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.main",
            "run",
            "--data",
            str(tmp_path),
            "--port",
            "0",
            "--db-url",
            "mysql://root@127.0.0.1/test",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "edgefleet-server: error: unsupported database URL 'mysql'" in proc.stderr


def test_restart_reuses_keys_repository_token_and_devices(tmp_path: Path) -> None:
    config = ServerConfig(
        data_dir=tmp_path, port=0, enrollment_tokens=("enroll-me",), log_level="warning"
    )
    first = start_server(config)
    try:
        root = first.repo.root_bytes()
        body = {
            "token": "enroll-me",
            "hardware_id": "hw-restart",
            "profile": "rpi4",
            "variant_preference": ["int8-cpu"],
            "agent_version": "0.1.0",
        }
        device = requests.post(f"{first.url}/api/v1/enroll", json=body, timeout=10).json()
    finally:
        first.stop()
    second = start_server(config)
    try:
        assert second.operator_token == first.operator_token
        assert second.repo.root_bytes() == root
        listed = requests.get(
            f"{second.url}/api/v1/devices",
            headers={"Authorization": f"Bearer {second.operator_token}"},
            timeout=10,
        ).json()
        assert [d["id"] for d in listed] == [device["device_id"]]
    finally:
        second.stop()
    (tmp_path / "operator.token").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        start_server(config)


def test_a_failed_start_stops_every_part_it_started(tmp_path: Path) -> None:
    """The HTTP port is taken: start fails after the broker, ingest and writer are up,
    and must leave no thread and no listening broker behind."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    before = {t.ident for t in threading.enumerate()}
    config = ServerConfig(
        data_dir=tmp_path, port=port, operator_token="op-" + "x" * 24, log_level="warning",
        mqtt_bind_port=0,
    )  # fmt: skip
    try:
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            start_server(config)
    finally:
        taken.close()
    deadline = time.monotonic() + 10
    while True:
        left = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == []

"""agent.sdnotify against real AF_UNIX datagram sockets, as systemd provides them."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import sdnotify


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield sock, {"NOTIFY_SOCKET": str(path)}
    finally:
        sock.close()


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode("utf-8")


def test_ready_watchdog_status_stopping(listener: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = listener
    assert sdnotify.ready(env)
    assert receive(sock) == "READY=1"
    assert sdnotify.watchdog(env)
    assert receive(sock) == "WATCHDOG=1"
    assert sdnotify.status("running release 3\non slot b", env)
    assert receive(sock) == "STATUS=running release 3 on slot b"
    assert sdnotify.stopping(env)
    assert receive(sock) == "STOPPING=1"


def test_reads_notify_socket_from_the_process_environment(
    listener: tuple[socket.socket, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, env = listener
    monkeypatch.setenv("NOTIFY_SOCKET", env["NOTIFY_SOCKET"])
    assert sdnotify.notify("READY=1\nSTATUS=up")
    assert receive(sock) == "READY=1\nSTATUS=up"


def test_abstract_namespace_socket() -> None:
    name = f"edgefleet-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert sdnotify.ready({"NOTIFY_SOCKET": "@" + name})
        assert receive(sock) == "READY=1"


def test_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    assert sdnotify.watchdog({}) is False


def test_unreachable_or_malformed_socket_is_reported_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert sdnotify.ready({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")}) is False
    assert "sd_notify" in caplog.text
    assert sdnotify.ready({"NOTIFY_SOCKET": "relative/path.sock"}) is False
    assert "neither a path" in caplog.text


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ({"WATCHDOG_USEC": "thirty"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "self"}, None),
])
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert sdnotify.watchdog_interval(env) == expected

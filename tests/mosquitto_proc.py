"""A private Mosquitto process for tests: own port, own password/ACL files, own persistence.

It runs the configuration shipped in ``deploy/mosquitto/mosquitto.conf``
(packet size limit, queue limits, persistence, no anonymous clients) with
this test's paths, port and logging in place of the site-specific lines.
Never the system broker on 1883 (it allows anonymous clients, so ACL tests
would prove nothing there). ``configure_from_server`` runs the real operator
flow: ``edgefleet mqtt export-acl`` against a running server, then SIGHUP.
"""

from __future__ import annotations

import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from conftest import service_unavailable
from paho.mqtt.enums import CallbackAPIVersion

from server.cli import main as cli_main
from server.mqtt.acl import build_files, ingest_password_hash

MOSQUITTO = "/usr/sbin/mosquitto"
INGEST_USER = "edgefleet-ingest"
WAIT_S = 20.0
DEPLOY_CONF = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto" / "mosquitto.conf"
SITE_MARKER = "# --- site-specific listeners"


def directives(text: str) -> dict[str, list[str]]:
    """Every directive of a Mosquitto configuration and its values, in order (comments skipped)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            found.setdefault(key, []).append(value.strip())
    return found


def render_config(text: str, overrides: dict[str, str | None], extra: list[str]) -> str:
    """The shipped configuration up to its site-specific part, ``overrides`` replacing
    (None: removing) directives, then ``extra`` lines (the test's listener)."""
    lines, seen = [], set()
    for line in text.split(SITE_MARKER, 1)[0].splitlines():
        key = (
            line.split(maxsplit=1)[0] if line.strip() and not line.lstrip().startswith("#") else ""
        )
        if key in overrides:
            value = overrides[key]
            if key not in seen and value is not None:
                lines.append(f"{key} {value}")
            seen.add(key)
            continue
        lines.append(line)
    lines += [f"{k} {v}" for k, v in overrides.items() if k not in seen and v is not None]
    return "\n".join([*lines, *extra]) + "\n"


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Mosquitto:
    """One broker process; ``stop``/``start`` keep the port, config and persistence."""

    def __init__(self, workdir: Path, tls: TlsFiles | None = None) -> None:
        if shutil.which(MOSQUITTO) is None:
            service_unavailable(MOSQUITTO, "not installed")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        self.ingest_password = secrets.token_urlsafe(24)
        self.passwd = self.dir / "passwd"
        self.acl = self.dir / "acl"
        self.log = self.dir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None
        files = build_files(
            [], INGEST_USER, ingest_password_hash(INGEST_USER, self.ingest_password)
        )
        self.passwd.write_text(files.passwd)
        self.acl.write_text(files.acl)
        self.conf = self.dir / "mosquitto.conf"
        overrides: dict[str, str | None] = {
            "password_file": str(self.passwd),
            "acl_file": str(self.acl),
            "persistence_location": f"{self.dir}/",
            "log_dest": f"file {self.log}",
            "log_type": "all",
            "user": "root" if os.geteuid() == 0 else None,
        }
        listener = [f"listener {self.port} 127.0.0.1"]
        if tls is not None:
            listener += [f"cafile {tls.ca}", f"certfile {tls.cert}", f"keyfile {tls.key}"]
        self.conf.write_text(render_config(DEPLOY_CONF.read_text(), overrides, listener))

    @property
    def ingest_url(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{INGEST_USER}:{self.ingest_password}@127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + WAIT_S
        while True:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"mosquitto exited: {err} {self.log_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(WAIT_S)
        self.process = None

    def reload(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def connack(self, username: str, password: str, **tls: Any) -> Any:
        """The CONNACK reason a fresh client gets with these credentials."""
        return connack("127.0.0.1", self.port, username, password, **tls)

    def configure_from_server(self, server_url: str, operator_token: str) -> None:
        """Export the fleet's files with the real CLI into this broker's paths, then reload."""
        argv = ["--server", server_url, "--token", operator_token, "mqtt", "export-acl"]
        assert cli_main([*argv, str(self.dir)]) == 0
        self.reload()


def connack(host: str, port: int, username: str, password: str, **tls: Any) -> Any:
    result: list[Any] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{secrets.token_hex(4)}")
    client.username_pw_set(username, password)
    if tls:
        client.tls_set(**tls)
    client.on_connect = lambda _c, _u, _f, rc, _p: result.append(rc)
    client.connect(host, port)
    client.loop_start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not result and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        client.disconnect()
        client.loop_stop()
    assert result, "no CONNACK"
    return result[0]


def wait_login(host: str, port: int, username: str, password: str, **tls: Any) -> None:
    """Retry until the broker accepts the login (a SIGHUP reload is asynchronous)."""
    deadline = time.monotonic() + WAIT_S
    while connack(host, port, username, password, **tls).is_failure:
        assert time.monotonic() < deadline, f"{username} never got in"
        time.sleep(0.1)


class Peer:
    """A paho client recording SUBACKs and messages for a test to await."""

    def __init__(
        self, host: str, port: int, username: str, password: str, *, client_id: str | None = None
    ) -> None:
        self.subacks: queue.Queue[list[Any]] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        connacks: queue.Queue[Any] = queue.Queue()
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or f"peer-{secrets.token_hex(4)}"
        )
        client.username_pw_set(username, password)
        client.on_connect = lambda _c, _u, _f, rc, _p: connacks.put(rc)
        client.on_subscribe = lambda _c, _u, _m, rcs, _p: self.subacks.put(list(rcs))
        client.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        client.connect(host, port)
        client.loop_start()
        self.client = client
        self.connack = connacks.get(timeout=WAIT_S)

    def subscribe(self, topic_filter: str) -> Any:
        self.client.subscribe(topic_filter, qos=1)
        return self.subacks.get(timeout=WAIT_S)[0]

    def publish(self, topic_name: str, payload: bytes | str) -> None:
        self.client.publish(topic_name, payload, qos=1).wait_for_publish(WAIT_S)

    def next_message(self) -> tuple[str, bytes]:
        return self.messages.get(timeout=WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

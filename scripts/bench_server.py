"""The fleet server in its own process for the benchmarks, on a fresh PostgreSQL schema.

``fresh_schema`` gives a run its own schema (dropped at the end);
``server_process`` starts ``edgefleet-server run`` on a free loopback port and
waits for ``/healthz``; ``publish`` uploads releases 1 and 2 of the test model;
``tick_counters`` reads the rollout engine's tick counters from ``/metrics``.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import requests
from bench_proc import free_port
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


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


@contextmanager
def server_process(
    db_url: str,
    data: Path,
    *,
    poll_s: float,
    push_rate: float,
    mqtt_url: str | None,
    tick_s: float,
) -> Iterator[dict[str, Any]]:
    """``edgefleet-server run`` in its own session; yields its URL, tokens and pid."""
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
        str(poll_s),
        "--push-rate",
        str(push_rate),
        "--log-level",
        "warning",
        "--ingest-client-id",
        f"bench-ingest-{secrets.token_hex(4)}",
    ]
    if mqtt_url:
        cmd += ["--mqtt-url", mqtt_url]
    env = {**os.environ, "EDGEFLEET_ROLLOUT_TICK_S": str(tick_s)}
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

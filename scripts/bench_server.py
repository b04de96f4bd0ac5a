"""The fleet server in its own process for the benchmarks, on a fresh PostgreSQL schema.

``fresh_schema`` gives a run its own schema (dropped at the end);
``server_process`` starts ``edgefleet-server run`` on a free loopback port and
waits for ``/healthz``; ``publish`` uploads releases 1 and 2 of the test model;
``tick_counters`` reads the rollout engine's tick counters from ``/metrics``;
``static_host`` runs a private nginx on loopback that serves the server's TUF
repository directory as ``/tuf/metadata/`` and ``/tuf/targets/`` (the server's
``--targets-url``, the simulator's ``--artifacts-url``).
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
    targets_url: str | None = None,
    workers: int = 1,
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
    if targets_url:
        cmd += ["--targets-url", targets_url]
    if workers > 1:  # N HTTP processes (PostgreSQL); the first process runs the services
        cmd += ["--workers", str(workers)]
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


def autovacuum_on(db_url: str) -> bool:
    with psycopg.connect(db_url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SHOW autovacuum").fetchone()
    return row is not None and row[0] == "on"


def vacuum_like_autovacuum(db_url: str, *, analyze_all: bool = False) -> list[str]:
    """What autovacuum would do now to this run's schema, for a server running without it.

    Tables past autovacuum's default thresholds (dead rows over 20% of the live ones
    plus 50; rows changed since the last analyze over 10% plus 50) are vacuumed and
    analyzed; ``analyze_all`` analyzes every table (after a bulk load). Only this
    schema's tables: the database is shared. Returns the tables touched.
    """
    touched = []
    with psycopg.connect(db_url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT relname, n_live_tup, n_dead_tup, n_mod_since_analyze "
            "FROM pg_stat_user_tables WHERE schemaname = current_schema()"
        ).fetchall()
        for name, live, dead, changed in rows:
            vacuum = dead > 0.2 * live + 50
            if vacuum or analyze_all or changed > 0.1 * live + 50:
                verb = "VACUUM (ANALYZE) {}" if vacuum else "ANALYZE {}"
                conn.execute(sql.SQL(verb).format(sql.Identifier(name)))
                touched.append(name)
    return touched


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


def mean_tick_ms(
    url: str, token: str, before: tuple[float, float], sampled: list[float]
) -> tuple[float, str]:
    """The mean engine tick (ms) since ``before`` from the scheduler's counters, else the
    mean of ``sampled`` decisions' ``tick_ms``; and how it was measured."""
    ticks_after, seconds_after = tick_counters(url, token)
    ticks = ticks_after - before[0]
    if ticks:
        tick_ms = 1000 * (seconds_after - before[1]) / ticks
        return (
            tick_ms,
            f"engine ticks by the server's scheduler: {ticks:.0f}, mean {tick_ms:.1f} ms",
        )
    # --workers: /metrics answers from an HTTP worker, the scheduler runs in another process
    tick_ms = sum(sampled) / len(sampled) if sampled else float("nan")
    return tick_ms, (
        f"engine ticks sampled from the rollout's last decision: {len(sampled)}, "
        f"mean {tick_ms:.1f} ms"
    )


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} {five:.1f} {fifteen:.1f} on {os.cpu_count()} cores"


NGINX_CONF = """\
daemon off;
worker_processes 1;
{user}pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    log_not_found off;  # every refresh probes the next root version: 404 is the answer
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    sendfile on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        # Unversioned metadata (timestamp.json, root.json) is replaced in place: no caching.
        location /tuf/metadata/ {{
            alias {repo}/metadata/;
            add_header Cache-Control "no-cache";
        }}
        # Stored target names carry their sha256: the bytes behind a URL never change.
        location /tuf/targets/ {{
            alias {repo}/targets/;
            add_header Cache-Control "public, max-age=31536000, immutable";
        }}
    }}
}}
"""


@contextmanager
def static_host(repo: Path, work: Path, nginx: str = "nginx") -> Iterator[str]:
    """A private nginx on a free loopback port serving ``repo``'s TUF layout; yields its URL.

    Its own config, pid file and logs under ``work``; stopped (its pid only) on exit.
    """
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # As root, workers would drop to ``nobody``, which cannot read a 0700 temp dir.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, work=work, port=port, repo=repo))
    log = open(work / "nginx.out", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [nginx, "-c", str(conf), "-p", str(work), "-e", str(work / "nginx-error.log")],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"nginx exited: see {work / 'nginx-error.log'}")
            try:
                requests.get(url + "/tuf/metadata/", timeout=2)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise SystemExit("nginx did not come up within 20 s") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGQUIT)  # graceful: the master stops its workers
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()

"""The rollout bench's stand-in for autovacuum on its own schema (a server without it):
tables past autovacuum's thresholds are vacuumed and analyzed, the others left alone,
and tables of other schemas in the shared database are never touched."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psycopg
from conftest import service_unavailable
from waiting import wait_for

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
PG = os.environ.get("EDGEFLEET_PG_URL", "postgresql://postgres@127.0.0.1:5432/test").replace(
    "postgresql+psycopg://", "postgresql://"
)


def _stats(url: str, table: str) -> tuple[int, bool]:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT n_mod_since_analyze, last_analyze IS NOT NULL FROM pg_stat_user_tables "
            "WHERE schemaname = current_schema() AND relname = %s",
            (table,),
        ).fetchone()
    assert row is not None
    return int(row[0]), bool(row[1])


def test_vacuum_like_autovacuum_touches_only_tables_past_the_thresholds() -> None:
    sys.path.insert(0, str(SCRIPTS))
    try:
        from bench_server import fresh_schema, vacuum_like_autovacuum  # noqa: PLC0415
    finally:
        sys.path.remove(str(SCRIPTS))
    try:
        schema = fresh_schema(PG)
        url = schema.__enter__()
    except psycopg.OperationalError as err:  # pragma: no cover - no database here
        service_unavailable("PostgreSQL", err)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE churned (a int PRIMARY KEY, b int)")
            conn.execute("CREATE TABLE quiet (a int PRIMARY KEY)")
            conn.execute("INSERT INTO churned SELECT g, g FROM generate_series(1, 2000) g")
            conn.execute("INSERT INTO quiet SELECT g FROM generate_series(1, 10) g")
        assert set(vacuum_like_autovacuum(url, analyze_all=True)) == {"churned", "quiet"}
        assert _stats(url, "quiet")[1] and _stats(url, "churned") == (0, True)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE churned SET b = b + 1")  # 2000 rows changed, 2000 dead
        # A backend's statistics reach shared memory when it flushes them (at its exit here).
        wait_for("the update counted", lambda: _stats(url, "churned")[0] == 2000)
        touched = vacuum_like_autovacuum(url)
        assert "churned" in touched and "quiet" not in touched
        assert _stats(url, "churned")[0] == 0  # analyzed again
    finally:
        schema.__exit__(None, None, None)

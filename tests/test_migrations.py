"""Schema migrations on SQLite and PostgreSQL: a database made by the last release
(``tests/schemas/c6bf72c``, its ``create_all`` frozen as SQL) is stamped and
upgraded by a real server start with its rows kept; an empty database reaches head
and matches the models; a database migrated by a newer server is refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine

from server.db.schema import (
    MIGRATIONS_DIR,
    RELEASE_REVISION,
    SchemaError,
    alembic_config,
    current_state,
    make_current,
    model_metadata,
    release_tables,
    schema_differences,
    script_directory,
)
from server.db.tables import make_engine

DUMPS = Path(__file__).parent / "schemas" / "c6bf72c"
NOW = datetime(2026, 12, 1, 9, 30, tzinfo=timezone.utc)
DEVICE = "dev-0001"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'edgefleet.db'}"
    return str(request.getfixturevalue("pg_url"))  # a fresh schema per test


@pytest.fixture
def engine(db_url: str) -> Any:
    engine = make_engine(db_url, pool_size=2)
    yield engine
    engine.dispose()


def load_release_schema(engine: Engine) -> None:
    """What release c6bf72c's ``create_all`` made: no ``alembic_version``."""
    sql = (DUMPS / f"{engine.dialect.name}.sql").read_text()
    body = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
    with engine.begin() as conn:
        for statement in filter(None, (s.strip() for s in body.split(";"))):
            conn.exec_driver_sql(statement)


def _blank(column: sa.Column[Any]) -> Any:
    kind = column.type
    if isinstance(kind, sa.JSON):
        return {}
    if isinstance(kind, sa.DateTime):
        return NOW
    if isinstance(kind, sa.Boolean):
        return False
    if isinstance(kind, sa.Integer):
        return 0
    if isinstance(kind, sa.Float):
        return 0.0
    return ""


# Rows as the release wrote them: an enrolled device on a model release under a
# rollout, with its events and telemetry. Columns not named get a plain value.
RELEASE_ROWS: dict[str, list[dict[str, Any]]] = {
    "devices": [
        {
            "id": DEVICE,
            "hardware_id": "hw-aa:bb:cc",
            "profile": "rpi5",
            "variant_preference": ["int8-cpu"],
            "tags": {"store": "17", "fleet": "test"},
            "token_hash": "a" * 64,
            "mqtt_password_hash": "$7$101$salt$hash",
            "created_at": NOW - timedelta(days=3),
            "last_seen": NOW,
            "state": "running",
            "installed_name": "digits",
            "installed_release": 1,
            "installed_variant": "int8-cpu",
            "installed_sha256": "b" * 64,
            "installed_slot": "a",
            "agent_version": "0.9.0",
        }
    ],
    "device_tags": [
        {"device_id": DEVICE, "key": "store", "value": "17"},
        {"device_id": DEVICE, "key": "fleet", "value": "test"},
    ],
    "models": [
        {
            "name": "digits",
            "release": release,
            "variant": "int8-cpu",
            "sha256": str(release) * 64,
            "length": 20480,
            "target_path": f"digits/{release}/int8-cpu.tflite",
            "labels": [str(n) for n in range(10)],
            "manifest": {"name": "digits", "release": release},
        }
        for release in (1, 2)
    ],
    "assignments": [
        {"target_kind": "tag", "target_value": "fleet=test", "name": "digits", "release": 1}
    ],
    "rollouts": [
        {
            "id": "r-0001",
            "name": "digits",
            "release": 2,
            "spec": {"stages": [{"size": "50%"}, {"size": "100%"}]},
            "status": {"reason": "operator paused"},
            "state": "paused",
            "stage_index": 0,
            "version": 4,
            "devices": 1,
        }
    ],
    "rollout_devices": [
        {"rollout_id": "r-0001", "device_id": DEVICE, "stage": 0, "rank": 1, "status": "pending"}
    ],
    "rollout_history": [
        {"rollout_id": "r-0001", "actor": "operator", "trigger": "pause", "to_state": "paused"}
    ],
    "events": [
        {"device_id": DEVICE, "type": "commit", "state": "idle", "source": "http", "detail": {}}
    ],
    "telemetry_latest": [
        {"device_id": DEVICE, "channel": "telemetry", "payload": {"fps": 12.5, "seq": 41}}
    ],
    "telemetry_rollups": [
        {"device_id": DEVICE, "model": "digits", "release": 1, "windows": 3, "inferences": 900}
    ],
    "ingest_cursors": [{"device_id": DEVICE, "seq": 41, "ts": 1764581400.0}],
}


def _serial(column: sa.Column[Any]) -> bool:
    return column.primary_key and isinstance(column.type, sa.Integer) and column.name == "id"


def fill_release_rows(engine: Engine) -> None:
    meta = sa.MetaData()
    meta.reflect(engine, only=list(RELEASE_ROWS))
    with engine.begin() as conn:
        for name, rows in RELEASE_ROWS.items():  # in foreign-key order
            table = meta.tables[name]
            for row in rows:
                full = {
                    col.name: row.get(col.name, _blank(col))
                    for col in table.columns
                    if col.name in row or not (col.nullable or _serial(col))
                }
                conn.execute(table.insert().values(full))


def count_rows(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            name: conn.execute(sa.select(sa.func.count()).select_from(sa.table(name))).scalar_one()
            for name in RELEASE_ROWS
        }


def expected_counts() -> dict[str, int]:
    return {name: len(rows) for name, rows in RELEASE_ROWS.items()}


def test_empty_database_upgrades_to_head_and_matches_the_models(engine: Engine) -> None:
    before, after = make_current(engine)
    assert before.current == () and after.is_current
    assert after.head == script_directory().get_current_head()
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, model_metadata()) == []
    assert schema_differences(engine) == []
    assert make_current(engine)[0].is_current  # a second start changes nothing


def test_revision_0001_is_the_schema_the_release_made(engine: Engine) -> None:
    load_release_schema(engine)
    released = sa.MetaData()
    released.reflect(engine)
    assert sorted(released.tables) == sorted(release_tables(script_directory()))
    released.drop_all(engine)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), RELEASE_REVISION)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, released) == []


def test_release_database_is_stamped_and_upgraded_by_a_server_start_keeping_its_rows(
    db_url: str, engine: Engine, tmp_path: Path, server_factory: Callable[..., Any]
) -> None:
    load_release_schema(engine)
    fill_release_rows(engine)
    assert current_state(engine).unversioned_release
    server = server_factory(tmp_path / "data", db_url=db_url)
    state = current_state(engine)
    assert state.is_current and state.head != RELEASE_REVISION
    assert count_rows(engine) == expected_counts()
    assert schema_differences(engine) == []  # the tables the release lacked exist now

    auth = {"Authorization": f"Bearer {server.operator_token}"}
    device = requests.get(f"{server.url}/api/v1/devices/{DEVICE}", headers=auth, timeout=30)
    assert device.status_code == 200, device.text
    body = device.json()
    assert body["tags"] == {"store": "17", "fleet": "test"}
    assert body["installed"]["release"] == 1
    assert body["telemetry"]["telemetry"]["payload"] == {"fps": 12.5, "seq": 41}
    assert [e["type"] for e in body["events"]] == ["commit"]
    models = requests.get(f"{server.url}/api/v1/models", headers=auth, timeout=30)
    assert models.status_code == 200, models.text
    assert sorted((m["name"], m["release"]) for m in models.json()) == [
        ("digits", 1),
        ("digits", 2),
    ]
    rollouts = requests.get(f"{server.url}/api/v1/rollouts", headers=auth, timeout=30)
    assert [(r["id"], r["state"], r["reason"]) for r in rollouts.json()] == [
        ("r-0001", "paused", "operator paused")
    ]


def test_database_at_an_older_revision_is_upgraded_keeping_its_rows(engine: Engine) -> None:
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), RELEASE_REVISION)
    fill_release_rows(engine)
    before, after = make_current(engine)
    assert before.current == (RELEASE_REVISION,) and after.is_current
    assert count_rows(engine) == expected_counts()
    assert schema_differences(engine) == []


def test_a_database_migrated_by_a_newer_server_is_refused(
    db_url: str, engine: Engine, tmp_path: Path, server_factory: Callable[..., Any]
) -> None:
    make_current(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9001'"))
    with pytest.raises(SchemaError, match="revision 9001, which this server does not know") as err:
        server_factory(tmp_path / "data", db_url=db_url)
    assert err.value.found == ("9001",)
    assert err.value.head == script_directory().get_current_head()
    assert current_state(engine).current == ("9001",)  # untouched


def test_release_tables_with_some_missing_are_refused(engine: Engine) -> None:
    load_release_schema(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE shadow_results")
    with pytest.raises(SchemaError, match="lacks shadow_results"):
        make_current(engine)


def test_servers_starting_together_migrate_once(db_url: str) -> None:
    """Each starter takes the migration lock (advisory on PostgreSQL, BEGIN IMMEDIATE on
    SQLite); without it, the second CREATE TABLE of the same name fails."""
    load_release_schema(make_engine(db_url))
    engines = [make_engine(db_url, pool_size=1) for _ in range(4)]
    results: list[Any] = []
    barrier = threading.Barrier(len(engines))

    def start(engine: Engine) -> None:
        barrier.wait()
        try:
            results.append(make_current(engine))
        except Exception as err:  # collected and asserted below
            results.append(err)

    threads = [threading.Thread(target=start, args=(e,)) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(isinstance(r, tuple) for r in results), results
    assert sum(1 for before, _after in results if before.unversioned_release) == 1
    assert all(after.is_current for _before, after in results)
    for engine in engines:
        engine.dispose()


def test_db_commands_upgrade_and_report_the_revision(tmp_path: Path) -> None:
    def db(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "server.main", "db", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={k: v for k, v in os.environ.items() if k != "EDGEFLEET_DB_URL"},
        )

    head = script_directory().get_current_head()
    data = tmp_path / "data"
    data.mkdir()
    load_release_schema(make_engine(f"sqlite:///{data / 'edgefleet.db'}"))
    current = db("current", "--data", str(data))
    assert current.returncode == 0 and "stamps 0001" in current.stdout, current.stderr
    upgrade = db("upgrade", "--data", str(data))
    expected = f"upgraded from unversioned (stamped 0001) to {head}"
    assert upgrade.stdout.strip() == expected, upgrade.stderr
    assert db("current", "--data", str(data)).stdout.strip() == f"{head} (head)"
    check = db("check", "--data", str(data))
    assert check.returncode == 0 and check.stdout.startswith("0 difference"), check.stdout
    history = db("history").stdout.splitlines()
    assert history[0].startswith(f"{head} (head)") and history[-1].startswith("0001 ")
    missing = db("current", "--data", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "no database at" in missing.stderr


REBUILD_DEVICES = """
import sqlalchemy as sa
from alembic import op

revision = "0099"
down_revision = {head!r}


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:  # SQLite: copy, drop, rename
        batch.alter_column("agent_version", existing_type=sa.String(32), type_=sa.String(64))
"""


def test_a_table_rebuilt_on_sqlite_keeps_the_rows_that_point_at_it(
    engine: Engine, tmp_path: Path
) -> None:
    """SQLite ALTERs copy ``devices`` and drop the original; with foreign keys on, that
    drop would cascade-delete the device's tags, events, rollout rows and telemetry."""
    make_current(engine)
    fill_release_rows(engine)
    location = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, location, ignore=shutil.ignore_patterns("__pycache__"))
    head = script_directory().get_current_head()
    (location / "versions" / "0099_rebuild_devices.py").write_text(
        REBUILD_DEVICES.format(head=head)
    )
    before, after = make_current(engine, location=location)
    assert before.current == (head,) and after.current == ("0099",)
    assert count_rows(engine) == expected_counts()
    with engine.connect() as conn:
        columns = {c["name"]: c["type"] for c in sa.inspect(conn).get_columns("devices")}
        assert getattr(columns["agent_version"], "length", None) == 64
        if engine.dialect.name == "sqlite":  # the pooled connection has them back on
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1

"""Make a database's schema current through the Alembic migrations in ``migrations/``.

Alembic is configured here in code, so an installed wheel migrates without an
``alembic.ini``. ``make_current`` is what the server runs at start:

- an empty database is upgraded to head;
- a database made by the last release without migrations (its tables, but no
  ``alembic_version``) is stamped at that release's revision, then upgraded;
- a database at an older revision is upgraded;
- a database at a revision this code does not know (a newer server migrated
  it) is refused: running old code against a newer schema corrupts data.

The whole upgrade is one transaction that also serialises concurrent starters:
an advisory lock on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from sqlalchemy import Connection, Engine, MetaData, inspect, text

from server.errors import ServerError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
RELEASE_REVISION = "0001"  # the schema of release c6bf72c, made by create_all before Alembic
VERSION_TABLE = "alembic_version"
# pg_advisory_xact_lock key: any constant bigint, the same in every server process.
LOCK_KEY = 0x45_64_67_65_46_6C_74  # "EdgeFlt"


class SchemaError(ServerError):
    """The database's schema cannot be made current by this server."""

    def __init__(self, message: str, found: Sequence[str] = (), head: str = "") -> None:
        super().__init__(message)
        self.found = tuple(found)
        self.head = head


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands against this code's migrations."""

    current: tuple[str, ...]  # revisions in alembic_version; () when it has none
    head: str  # the newest revision this code knows
    unknown: tuple[str, ...]  # revisions in the database that this code does not know
    release_tables: tuple[str, ...]  # tables of the pre-Alembic release that exist

    @property
    def is_current(self) -> bool:
        return self.current == (self.head,)

    def label(self) -> str:
        if self.current:
            return ", ".join(self.current)
        return f"unversioned (stamped {RELEASE_REVISION})" if self.release_tables else "empty"

    @property
    def unversioned_release(self) -> bool:
        """Tables made by ``create_all`` of the last release, never stamped."""
        return not self.current and bool(self.release_tables)


def alembic_config(
    connection: Connection | None = None,
    metadata: MetaData | None = None,
    location: Path = MIGRATIONS_DIR,
) -> Config:
    """Alembic's configuration, in code; ``connection`` is the one migrations run on."""
    config = Config()
    config.set_main_option("script_location", str(location).replace("%", "%%"))
    config.attributes["connection"] = connection
    config.attributes["target_metadata"] = metadata
    return config


def script_directory(location: Path = MIGRATIONS_DIR) -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config(location=location))


def history() -> list[Script]:
    """Every revision, newest first."""
    return list(script_directory().walk_revisions())


def release_tables(script: ScriptDirectory) -> tuple[str, ...]:
    """The tables revision 0001 creates: what the last pre-Alembic release made."""
    module: Any = script.get_revision(RELEASE_REVISION).module
    return tuple(module.TABLES)


def read_state(conn: Connection, script: ScriptDirectory | None = None) -> SchemaState:
    script = script or script_directory()
    head = script.get_current_head()
    assert head is not None, "the migrations have one head"
    current = tuple(sorted(MigrationContext.configure(conn).get_current_heads()))
    known = {rev.revision for rev in script.walk_revisions()}
    existing = set(inspect(conn).get_table_names())
    return SchemaState(
        current=current,
        head=head,
        unknown=tuple(rev for rev in current if rev not in known),
        release_tables=tuple(t for t in release_tables(script) if t in existing),
    )


def current_state(engine: Engine) -> SchemaState:
    with engine.connect() as conn:
        return read_state(conn)


def make_current(
    engine: Engine, metadata: MetaData | None = None, location: Path = MIGRATIONS_DIR
) -> tuple[SchemaState, SchemaState]:
    """Upgrade the database to head (see the module doc); returns the states before and after.

    With ``metadata``, a table of the code that no migration made is an error here
    rather than a failed query later.
    """
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            # Batch ALTERs rebuild a table (copy, drop, rename). With foreign keys on,
            # dropping ``devices`` would cascade-delete every row that points at it, so
            # they go off (only possible outside a transaction) and are checked at the end.
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # one migrator; DDL is transactional
        elif conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
        try:
            before, after = _upgrade(conn, location)
            if metadata is not None:
                _check_tables(conn, metadata)
            if sqlite:
                _check_foreign_keys(conn)
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()
    if before.current != after.current:
        log.info("database schema upgraded from %s to %s", before.label(), after.head)
    return before, after


def _upgrade(conn: Connection, location: Path) -> tuple[SchemaState, SchemaState]:
    script = script_directory(location)
    before = read_state(conn, script)
    if before.unknown:
        raise SchemaError(
            f"the database schema is at revision {', '.join(before.unknown)}, which this "
            f"server does not know (its newest is {before.head}): a newer EdgeFleet server "
            "migrated it; run that version, or restore a backup made before it",
            found=before.current,
            head=before.head,
        )
    config = alembic_config(conn, location=location)
    if before.unversioned_release:
        missing = sorted(set(release_tables(script)) - set(before.release_tables))
        if missing:
            raise SchemaError(
                f"the database has EdgeFleet tables but no {VERSION_TABLE} and lacks "
                f"{', '.join(missing)}: it was not made by a released server",
                head=before.head,
            )
        log.info("database made by the release before migrations: stamping %s", RELEASE_REVISION)
        command.stamp(config, RELEASE_REVISION)
    if not before.is_current:
        command.upgrade(config, "head")
    return before, read_state(conn, script)


def _check_tables(conn: Connection, metadata: MetaData) -> None:
    missing = sorted(set(metadata.tables) - set(inspect(conn).get_table_names()))
    if missing:
        raise SchemaError(
            f"tables {', '.join(missing)} are in the code but no migration creates them: "
            "add a revision under server/db/migrations/versions"
        )


def _check_foreign_keys(conn: Connection) -> None:
    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        tables = sorted({str(row[0]) for row in broken})
        raise SchemaError(f"the upgrade left rows with broken foreign keys in {tables}")


def model_metadata() -> MetaData:
    """The metadata of every table the server's code defines, for comparing with a database.

    Tables register on ``Base`` when their module is imported, so every server
    module is imported (the migrations and ``__main__`` modules excepted). A module
    that needs an extra which is not installed is skipped: tables live with the
    server's own dependencies.
    """
    import server  # noqa: PLC0415 - the whole package, only when asked
    from server.db.tables import Base  # noqa: PLC0415 - tables imports this module

    for info in pkgutil.walk_packages(server.__path__, "server."):
        if info.name.startswith("server.db.migrations") or info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as err:
            if (err.name or "server").split(".")[0] in ("server", "agent"):
                raise
            log.debug("skipped %s: %s is not installed", info.name, err.name)
    return Base.metadata


def schema_differences(engine: Engine) -> list[Any]:
    """What autogenerate would change to make the database match the code (``[]``: nothing)."""
    from alembic.autogenerate import compare_metadata  # noqa: PLC0415 - only for checks

    metadata = model_metadata()
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))  # leaves alembic_version out


def drop_version_table(engine: Engine) -> None:
    """Forget the schema revision (with ``drop_all``, so the next start creates it anew)."""
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {VERSION_TABLE}")

"""``edgefleet-server db upgrade|current|history|check``: the schema outside a server start.

``run`` upgrades the schema by itself at start; these commands let an operator
do it as a separate step (before rolling out replicas), see where a database
stands, or check that it matches the code.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from server.config import normalize_db_url
from server.db.schema import (
    RELEASE_REVISION,
    SchemaState,
    current_state,
    history,
    make_current,
    schema_differences,
)
from server.db.tables import make_engine
from server.errors import ConfigError

DB_URL_ENV = "EDGEFLEET_DB_URL"


def add_db_parser(sub: Any) -> None:
    """Add the ``db`` command group to ``edgefleet-server``'s subcommands."""
    db = sub.add_parser("db", help="the database schema: upgrade, current revision, history")
    commands = db.add_subparsers(dest="db_command", required=True)
    for name, text in (
        ("upgrade", "upgrade the schema to this server's newest revision"),
        ("current", "print the database's schema revision"),
        ("check", "compare the database with the server's tables (exit 1 on a difference)"),
        ("history", "list the schema revisions this server knows, newest first"),
    ):
        cmd = commands.add_parser(name, help=text, description=text)
        if name != "history":
            cmd.add_argument("--data", type=Path, help="data directory: its SQLite database")
            cmd.add_argument(
                "--db-url",
                default=os.environ.get(DB_URL_ENV) or None,
                help=f"sqlite:///PATH or postgresql://USER@HOST/DB (default ${DB_URL_ENV})",
            )
        cmd.add_argument(
            "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
        )


def db_url_from_args(args: argparse.Namespace) -> str:
    if args.db_url:
        return normalize_db_url(args.db_url)
    if args.data is not None:  # where ``run --data`` keeps it (ServerConfig.resolve)
        path = args.data.expanduser().resolve() / "edgefleet.db"
        if args.db_command == "upgrade":
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.exists():
            raise ConfigError(f"no database at {path}")
        return normalize_db_url(f"sqlite:///{path}")
    raise ConfigError(f"give --db-url (or ${DB_URL_ENV}) or --data")


def run_db(args: argparse.Namespace) -> int:
    if args.db_command == "history":
        for script in history():
            head = " (head)" if script.is_head else ""
            print(f"{script.revision}{head}  {script.doc}")
        return 0
    engine = make_engine(db_url_from_args(args), pool_size=1)
    try:
        if args.db_command == "upgrade":
            before, after = make_current(engine)
            was = before.label()
            print(f"upgraded from {was} to {after.head}" if before != after else f"at {was}")
            return 0
        if args.db_command == "current":
            print(describe(current_state(engine)))
            return 0
        differences = schema_differences(engine)
        for diff in differences:
            print(diff)
        print(f"{len(differences)} difference(s) between the database and the code")
        return 1 if differences else 0
    finally:
        engine.dispose()


def describe(state: SchemaState) -> str:
    """One line for ``db current``."""
    if state.unknown:
        return (
            f"{', '.join(state.current)}: unknown to this server (newest {state.head}); "
            "a newer server migrated it"
        )
    if state.is_current:
        return f"{state.head} (head)"
    if state.current:
        return f"{', '.join(state.current)} (head is {state.head}: run `db upgrade`)"
    if state.unversioned_release:
        return f"unversioned, made before migrations: `db upgrade` stamps {RELEASE_REVISION}"
    return f"empty: `db upgrade` creates the schema at {state.head}"

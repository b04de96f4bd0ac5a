"""Alembic environment, configured in code by ``server.db.schema`` (no alembic.ini).

The caller hands over an open connection (``config.attributes["connection"]``)
whose transaction, and on PostgreSQL advisory lock, it already holds; the
migrations run inside that transaction. ``render_as_batch`` lets ALTERs work on
SQLite, which rebuilds the table instead.
"""

from __future__ import annotations

from alembic import context

config = context.config
connection = config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("run migrations through server.db.schema (edgefleet-server db ...)")

context.configure(
    connection=connection,
    target_metadata=config.attributes.get("target_metadata"),
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()

"""Alembic migrations of the server's database; ``server.db.schema`` runs them.

A package (as is ``versions``) so an installed wheel carries the revisions.
"""

"""What this release adds to the schema of release c6bf72c.

Push updates (``push_requests``: who should be told to check in now),
re-enrolment approvals (``reenroll_approvals``) and the background delta builds
(``delta_jobs``). Additive only, so a database upgraded from the release keeps
every row.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "delta_jobs",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("release", sa.Integer(), nullable=False),
        sa.Column("variant", sa.String(length=32), nullable=False),
        sa.Column("target_sha256", sa.String(length=64), nullable=False),
        sa.Column("target_bytes", sa.BigInteger(), nullable=False),
        sa.Column("base_release", sa.Integer(), nullable=False),
        sa.Column("base_sha256", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=True),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("delta_bytes", sa.BigInteger(), nullable=True),
        sa.Column("method", sa.String(length=32), nullable=True),
        sa.Column("worker", sa.String(length=64), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("full_downloads", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", "release", "variant", "base_sha256", name="uq_delta_jobs_base"),
    )
    with op.batch_alter_table("delta_jobs", schema=None) as batch_op:
        batch_op.create_index("ix_delta_jobs_state", ["state", "id"], unique=False)

    op.create_table(
        "push_requests",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("device_id"),
    )
    with op.batch_alter_table("push_requests", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_push_requests_requested_at"), ["requested_at"], unique=False
        )

    op.create_table(
        "reenroll_approvals",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("device_id"),
    )


def downgrade() -> None:
    op.drop_table("reenroll_approvals")
    with op.batch_alter_table("push_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_push_requests_requested_at"))

    op.drop_table("push_requests")
    with op.batch_alter_table("delta_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_delta_jobs_state")

    op.drop_table("delta_jobs")

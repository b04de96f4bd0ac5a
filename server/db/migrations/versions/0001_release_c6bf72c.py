"""The schema of the first release with migrations (git c6bf72c), table by table.

Frozen: written out here rather than taken from the live models, which move on.
A database that release made (by ``create_all``, with no ``alembic_version``)
is stamped at this revision by ``server.db.schema`` instead of running it.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a bigint.
_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# In creation order: a table comes after the tables its foreign keys name.
TABLES = (
    "assignments",
    "devices",
    "downloads",
    "enrollment_tokens",
    "model_reports",
    "models",
    "rollout_variants",
    "rollouts",
    "shadow_assignments",
    "accuracy_windows",
    "device_tags",
    "events",
    "ingest_cursors",
    "rollout_devices",
    "rollout_history",
    "shadow_results",
    "telemetry_latest",
    "telemetry_rollups",
)


def upgrade() -> None:
    op.create_table(
        "assignments",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("target_kind", sa.String(length=16), nullable=False),
        sa.Column("target_value", sa.String(length=200), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("release", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rollout_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_assignments_rollout_id"), "assignments", ["rollout_id"], unique=False)
    op.create_index(
        "ix_assignments_target", "assignments", ["target_kind", "target_value", "id"], unique=False
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("hardware_id", sa.String(length=128), nullable=False),
        sa.Column("profile", sa.String(length=64), nullable=False),
        sa.Column("variant_preference", sa.JSON(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("mqtt_password_hash", sa.String(length=160), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("installed_name", sa.String(length=64), nullable=True),
        sa.Column("installed_release", sa.Integer(), nullable=True),
        sa.Column("installed_variant", sa.String(length=32), nullable=True),
        sa.Column("installed_sha256", sa.String(length=64), nullable=True),
        sa.Column("installed_slot", sa.String(length=16), nullable=True),
        sa.Column("agent_version", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("hardware_id"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_index(op.f("ix_devices_last_seen"), "devices", ["last_seen"], unique=False)
    op.create_table(
        "downloads",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("update_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("release", sa.Integer(), nullable=False),
        sa.Column("variant", sa.String(length=32), nullable=False),
        sa.Column("via", sa.String(length=16), nullable=False),
        sa.Column("bytes_downloaded", sa.BigInteger(), nullable=False),
        sa.Column("target_bytes", sa.BigInteger(), nullable=False),
        sa.Column("fp32_bytes", sa.BigInteger(), nullable=True),
        sa.Column("fallback", sa.String(length=300), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "update_id", name="uq_downloads_update"),
    )
    op.create_index(op.f("ix_downloads_device_id"), "downloads", ["device_id"], unique=False)
    op.create_index(
        "ix_downloads_release", "downloads", ["name", "release", "variant"], unique=False
    )
    op.create_table(
        "enrollment_tokens",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("max_uses", sa.Integer(), nullable=True),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("note", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("token_hash"),
    )
    op.create_table(
        "model_reports",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("release", sa.Integer(), nullable=False),
        sa.Column("variant", sa.String(length=32), nullable=False),
        sa.Column("decision", sa.String(length=32), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("override_reason", sa.Text(), nullable=True),
        sa.Column("override_by", sa.String(length=64), nullable=True),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", "release", "variant", name="uq_model_reports"),
    )
    op.create_table(
        "models",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("release", sa.Integer(), nullable=False),
        sa.Column("variant", sa.String(length=32), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("target_path", sa.String(length=255), nullable=False),
        sa.Column("fp32_length", sa.BigInteger(), nullable=True),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", "release", "variant", name="uq_models_release"),
        sa.UniqueConstraint("target_path"),
    )
    op.create_table(
        "rollout_variants",
        sa.Column("rollout_id", sa.String(length=32), nullable=False),
        sa.Column("profile", sa.String(length=64), nullable=False),
        sa.Column("variant", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("rollout_id", "profile"),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("release", sa.Integer(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("status", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("stage_index", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.Column("event_cursor", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_tick_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_decision", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_rollouts_state"), "rollouts", ["state"], unique=False)
    op.create_table(
        "shadow_assignments",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("rollout_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("release", sa.Integer(), nullable=False),
        sa.Column("every_n", sa.Integer(), nullable=False),
        sa.Column("cpu_budget", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.create_index(
        op.f("ix_shadow_assignments_rollout_id"), "shadow_assignments", ["rollout_id"], unique=False
    )
    op.create_table(
        "accuracy_windows",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("release", sa.Integer(), nullable=False),
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        sa.Column("windows", sa.Integer(), nullable=False),
        sa.Column("inferences", sa.BigInteger(), nullable=False),
        sa.Column("class_counts", sa.JSON(), nullable=False),
        sa.Column("confidence_hist", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "model", "release", "bucket", name="uq_accuracy_windows"),
    )
    op.create_index("ix_accuracy_windows_bucket", "accuracy_windows", ["bucket"], unique=False)
    op.create_table(
        "device_tags",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("device_id", "key"),
    )
    op.create_index("ix_device_tags_kv", "device_tags", ["key", "value"], unique=False)
    op.create_table(
        "events",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=True),
        sa.Column("source", sa.String(length=8), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_events_device_time", "events", ["device_id", "time"], unique=False)
    op.create_table(
        "ingest_cursors",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("ts", sa.Float(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("telemetry_from", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_event_id", sa.BigInteger(), nullable=False),
        sa.Column("golden_accuracy", sa.Float(), nullable=True),
        sa.Column("previous_name", sa.String(length=64), nullable=True),
        sa.Column("previous_release", sa.Integer(), nullable=True),
        sa.Column("previous_variant", sa.String(length=32), nullable=True),
        sa.Column("baseline_p95_ms", sa.Float(), nullable=True),
        sa.Column("baseline_power_mw", sa.Float(), nullable=True),
        sa.Column("reverted_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("rollout_id", "device_id"),
    )
    op.create_index("ix_rollout_devices_device", "rollout_devices", ["device_id"], unique=False)
    op.create_index(
        "ix_rollout_devices_stage", "rollout_devices", ["rollout_id", "stage"], unique=False
    )
    op.create_table(
        "rollout_history",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("rollout_id", sa.String(length=32), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=16), nullable=False),
        sa.Column("trigger", sa.String(length=32), nullable=False),
        sa.Column("from_state", sa.String(length=32), nullable=False),
        sa.Column("to_state", sa.String(length=32), nullable=False),
        sa.Column("from_stage", sa.Integer(), nullable=False),
        sa.Column("to_stage", sa.Integer(), nullable=False),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("process", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        op.f("ix_rollout_history_rollout_id"), "rollout_history", ["rollout_id"], unique=False
    )
    op.create_table(
        "shadow_results",
        sa.Column("rollout_id", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("windows", sa.Integer(), nullable=False),
        sa.Column("shadowed", sa.BigInteger(), nullable=False),
        sa.Column("skipped", sa.BigInteger(), nullable=False),
        sa.Column("agreed", sa.BigInteger(), nullable=False),
        sa.Column("pairs", sa.JSON(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("candidate_p95_ms", sa.Float(), nullable=True),
        sa.Column("serving_p95_ms", sa.Float(), nullable=True),
        sa.Column("candidate_mj", sa.Float(), nullable=True),
        sa.Column("error", sa.String(length=200), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("rollout_id", "device_id"),
    )
    op.create_table(
        "telemetry_latest",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("device_id", "channel"),
    )
    op.create_table(
        "telemetry_rollups",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("profile", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("release", sa.Integer(), nullable=False),
        sa.Column("power_source", sa.String(length=16), nullable=False),
        sa.Column("windows", sa.Integer(), nullable=False),
        sa.Column("inferences", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("window_s_sum", sa.Float(), nullable=False),
        sa.Column("fps_sum", sa.Float(), nullable=False),
        sa.Column("cpu_windows", sa.Integer(), nullable=False),
        sa.Column("cpu_percent_sum", sa.Float(), nullable=False),
        sa.Column("rss_mb_max", sa.Float(), nullable=True),
        sa.Column("power_windows", sa.Integer(), nullable=False),
        sa.Column("power_mw_sum", sa.Float(), nullable=False),
        sa.Column("power_mw_max", sa.Float(), nullable=True),
        sa.Column("energy_inferences", sa.BigInteger(), nullable=False),
        sa.Column("energy_mj_sum", sa.Float(), nullable=False),
        sa.Column("energy_above_idle_mj_sum", sa.Float(), nullable=False),
        sa.Column("thermal_windows", sa.Integer(), nullable=False),
        sa.Column("throttled_windows", sa.Integer(), nullable=False),
        sa.Column("temp_max_c", sa.Float(), nullable=True),
        sa.Column("invoke_hist", sa.JSON(), nullable=False),
        sa.Column("invoke_p95_ms", sa.Float(), nullable=True),
        sa.Column("invoke_max_ms", sa.Float(), nullable=True),
        sa.Column("e2e_hist", sa.JSON(), nullable=False),
        sa.Column("e2e_p95_ms", sa.Float(), nullable=True),
        sa.Column("outbox_dropped", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "bucket", "device_id", "profile", "model", "release", "power_source", name="uq_rollup"
        ),
    )
    op.create_index(
        "ix_rollups_device_bucket", "telemetry_rollups", ["device_id", "bucket"], unique=False
    )
    op.create_index(
        "ix_rollups_release_bucket",
        "telemetry_rollups",
        ["model", "release", "bucket"],
        unique=False,
    )


def downgrade() -> None:
    for name in reversed(TABLES):
        op.drop_table(name)

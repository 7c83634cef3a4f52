"""Schema version 2: roles of a split deployment (the workers registry) and the trainer holding each run.

Revision ID: 0002_roles
Revises: 0001_initial
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tinkerd.store.tables import UtcDateTime

revision = "0002_roles"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("training_runs", sa.Column("trainer_id", sa.String(200)))
    op.create_index("ix_training_runs_trainer", "training_runs", ["trainer_id"])
    op.create_table(
        "workers",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("host", sa.String(300), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("base_models", sa.JSON, nullable=False),
        sa.Column("capacity", sa.Integer, nullable=False),
        sa.Column("health_url", sa.Text),
        sa.Column("started_at", UtcDateTime, nullable=False),
        sa.Column("heartbeat_at", UtcDateTime, nullable=False),
        sa.Column("lease_expires_at", UtcDateTime, nullable=False),
        sa.Column("stopped_at", UtcDateTime),
    )
    op.create_index("ix_workers_role_lease", "workers", ["role", "lease_expires_at"])
    op.execute(sa.text("UPDATE schema_version SET version = 2"))

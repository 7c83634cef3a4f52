"""Schema version 3: the step metrics of training runs (forward_backward and optim_step results, for curves).

Revision ID: 0003_step_metrics
Revises: 0002_roles
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tinkerd.store.tables import UtcDateTime

revision = "0003_step_metrics"
down_revision = "0002_roles"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "step_metrics",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(200), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("seq_id", sa.BigInteger),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("loss_weight", sa.Float),
        sa.Column("recorded_at", UtcDateTime, nullable=False),
    )
    op.create_index("ix_step_metrics_run", "step_metrics", ["run_id", "id"])
    op.execute(sa.text("UPDATE schema_version SET version = 3"))

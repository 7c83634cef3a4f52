"""Schema version 4: a sampling request lost with its sampler says so in its own column (``lost_by``), not in its
error message: the reaper requeues it once and fails it the second time.

Revision ID: 0004_lost_by
Revises: 0003_step_metrics
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_lost_by"
down_revision = "0003_step_metrics"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("futures", sa.Column("lost_by", sa.String(200)))
    op.execute(sa.text("UPDATE schema_version SET version = 4"))

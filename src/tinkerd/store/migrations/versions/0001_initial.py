"""Schema version 1: the tables tinkerd 0.1 created before it used Alembic (frozen in migrations/schema_v1.py).

Revision ID: 0001_initial
Revises:
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import insert

from tinkerd.store.migrations import schema_v1

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    schema_v1.metadata.create_all(bind)
    bind.execute(insert(schema_v1.schema_version).values(id=1, version=schema_v1.SCHEMA_VERSION))

"""Alembic's entry point: migrations run on the connection `store.schema` hands over (never from a config file)."""

from __future__ import annotations

from alembic import context

from tinkerd.store.tables import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite alters tables by copying them; Alembic's batch mode does that for us where needed.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()

"""Bringing a database to this tinkerd's schema: create it when empty, migrate it (Alembic) when older.

Four cases, decided inside one write transaction (on PostgreSQL under an advisory lock, so that several processes
starting at once agree):

- no tables: create the current schema directly (fast; no migration scripts are loaded) and stamp the head;
- `alembic_version` at the head: nothing to do;
- an older revision, or tinkerd 0.1's schema (a `schema_version` row of 1, no `alembic_version`): run the
  Alembic migrations from there to the head;
- a revision or version this tinkerd does not know (a newer tinkerd wrote it): refuse, naming both.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Column, Connection, MetaData, String, Table, insert, inspect, select, text

from tinkerd.domain.errors import TinkerdError
from tinkerd.store.tables import SCHEMA_HEAD, SCHEMA_VERSION, metadata, schema_version

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_FIRST_REVISION = "0001_initial"  # the schema tinkerd 0.1 made with create_all (schema_version 1)
_LOCK_KEY = 0x74696E6B  # "tink": PostgreSQL advisory lock held while the schema is checked or changed

# Alembic's own bookkeeping table, declared here so that an up-to-date database is checked without importing it.
alembic_version = Table("alembic_version", MetaData(), Column("version_num", String(32), primary_key=True))


class SchemaVersionError(TinkerdError):
    """The database was written by a tinkerd with a schema this one cannot open (a newer one)."""


def ensure_schema(conn: Connection, url_text: str) -> None:
    """Create or migrate the schema on `conn` (inside a transaction the caller commits).

    Raises SchemaVersionError for a database made by a newer tinkerd.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    tables = set(inspect(conn).get_table_names())
    if not tables & {"alembic_version", "schema_version"}:
        metadata.create_all(conn)
        conn.execute(insert(schema_version).values(id=1, version=SCHEMA_VERSION))
        alembic_version.create(conn)
        conn.execute(insert(alembic_version).values(version_num=SCHEMA_HEAD))
        return
    if "alembic_version" in tables:
        current = conn.execute(select(alembic_version.c.version_num)).scalar_one_or_none()
    else:
        found = conn.execute(select(schema_version.c.version)).scalar_one_or_none()
        if found != 1:
            raise SchemaVersionError(
                f"database {url_text} has schema version {found} and no migration history; "
                f"this tinkerd uses version {SCHEMA_VERSION} and cannot open it"
            )
        current = _FIRST_REVISION
    if current == SCHEMA_HEAD:
        return
    _migrate(conn, url_text, current)


def _migrate(conn: Connection, url_text: str, current: str | None) -> None:
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = conn
    known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
    if current not in known:
        raise SchemaVersionError(
            f"database {url_text} is at schema revision {current!r}, which this tinkerd does not know "
            f"(its newest is {SCHEMA_HEAD!r}): it was written by a newer tinkerd"
        )
    log.warning("migrating database %s from schema revision %s to %s", url_text, current, SCHEMA_HEAD)
    if current == _FIRST_REVISION and "alembic_version" not in inspect(conn).get_table_names():
        command.stamp(config, _FIRST_REVISION)
    command.upgrade(config, SCHEMA_HEAD)

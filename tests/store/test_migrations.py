"""Schema migrations: a database made by an older tinkerd opens in this one, with its data, on both backends."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, insert, select, update
from sqlalchemy.engine import make_url

from tinkerd.domain.ids import DEFAULT_OWNER
from tinkerd.domain.records import RequestKind
from tinkerd.store import Database, SchemaVersionError, Store
from tinkerd.store.db import with_driver
from tinkerd.store.migrations import schema_v1
from tinkerd.store.schema import alembic_version
from tinkerd.store.tables import SCHEMA_HEAD, SCHEMA_VERSION, metadata, schema_version

_T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _make_v1_database(url: str) -> None:
    """What tinkerd 0.1 (main before this change) did on first start, plus a session, a run and a queued request."""
    engine = create_engine(with_driver(make_url(url)))
    with engine.begin() as conn:
        schema_v1.metadata.create_all(conn)
        conn.execute(insert(schema_v1.schema_version).values(id=1, version=1))
        conn.execute(
            insert(schema_v1.sessions).values(
                id="s1", owner=DEFAULT_OWNER, sdk_version="0.38.0", tags=[], user_metadata={}, status="active",
                created_at=_T0, last_heartbeat_at=_T0,
            )
        )  # fmt: skip
        conn.execute(
            insert(schema_v1.training_runs).values(
                id="run1", session_id="s1", owner=DEFAULT_OWNER, base_model="tiny", is_lora=True, lora_rank=8,
                lora_alpha=16.0, lora_seed=None, train_attn=True, train_mlp=True, train_unembed=False,
                optimizer_config={}, user_metadata={}, corrupted=False, created_at=_T0, last_request_at=_T0,
            )
        )  # fmt: skip
        conn.execute(insert(schema_v1.model_cursors).values(model_id="run1", next_seq=1))
    engine.dispose()


def test_a_database_made_by_the_previous_schema_opens_with_its_data(db_url: str) -> None:
    _make_v1_database(db_url)
    store = Store.open(db_url)
    try:
        assert store.runs.get("run1", DEFAULT_OWNER).base_model == "tiny"
        assert store.futures.next_seq("run1") == 1
        # The new columns and tables exist and work.
        record = store.futures.submit(
            owner=DEFAULT_OWNER, model_id="run1", seq_id=1, kind=RequestKind.FORWARD, payload=b"x"
        )
        assert store.futures.claim_ready().futures[0].request_id == record.request_id
        version = store.db.read(lambda conn: conn.execute(select(schema_version.c.version)).scalar_one())
        head = store.db.read(lambda conn: conn.execute(select(alembic_version.c.version_num)).scalar_one())
        assert (version, head) == (SCHEMA_VERSION, SCHEMA_HEAD)
    finally:
        store.close()


def test_migrating_the_previous_schema_ends_at_exactly_the_current_one(db_url: str) -> None:
    _make_v1_database(db_url)
    Store.open(db_url).close()
    engine = create_engine(with_driver(make_url(db_url)))
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert diff == []


def test_a_fresh_database_is_stamped_at_the_head_and_reopens(db_url: str) -> None:
    Store.open(db_url).close()
    store = Store.open(db_url)  # a second start finds the head: nothing to do
    head = store.db.read(lambda conn: conn.execute(select(alembic_version.c.version_num)).scalar_one())
    assert head == SCHEMA_HEAD
    store.close()


def test_a_database_written_by_a_newer_tinkerd_is_refused(db_url: str) -> None:
    db = Database(db_url)
    db.create_schema()
    db.write(lambda conn: conn.execute(update(alembic_version).values(version_num="9999_future")))
    with pytest.raises(SchemaVersionError, match=r"9999_future.*newer tinkerd"):
        db.create_schema()
    db.dispose()


def test_an_unknown_pre_alembic_version_is_refused(db_url: str) -> None:
    engine = create_engine(with_driver(make_url(db_url)))
    with engine.begin() as conn:
        schema_v1.metadata.create_all(conn)
        conn.execute(insert(schema_v1.schema_version).values(id=1, version=7))
    engine.dispose()
    with pytest.raises(SchemaVersionError, match="schema version 7"):
        Database(db_url).create_schema()

"""The schema, in SQLAlchemy Core. Portable SQL: it runs on SQLite and PostgreSQL unchanged.

When a table changes shape: add an Alembic revision under `store/migrations/versions` that makes the change, set
SCHEMA_HEAD to its id and bump SCHEMA_VERSION (older tinkerds read it and refuse a database newer than they know).
tests/store/test_migrations.py checks that migrating an old database ends at exactly this schema.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator

SCHEMA_VERSION = 4
SCHEMA_HEAD = "0004_lost_by"  # the newest Alembic revision (store/migrations/versions)

ID = 200  # ids are at most 128 characters (domain.ids); the slack is free
OWNER = 255
NAME = 300


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, whatever the backend stores.

    SQLite keeps DATETIME as text without a zone, so values are normalised to UTC before binding (which also keeps
    text comparisons such as `expires_at <= :now` correct) and tagged UTC again on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: tinkerd stores timezone-aware UTC times only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1: a single-row table
    Column("version", Integer, nullable=False),
)

sessions = Table(
    "sessions",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("owner", String(OWNER), nullable=False),
    Column("sdk_version", String(64), nullable=False),
    Column("tags", JSON, nullable=False),
    Column("user_metadata", JSON, nullable=False),
    Column("display_name", Text),
    Column("project_id", String(ID)),
    Column("status", String(32), nullable=False),
    Column("finish_reason", String(32)),
    Column("status_detail", Text),
    Column("created_at", UtcDateTime, nullable=False),
    Column("last_heartbeat_at", UtcDateTime, nullable=False),
    Column("closed_at", UtcDateTime),
    Index("ix_sessions_owner_created", "owner", "created_at", "id"),
    Index("ix_sessions_status_heartbeat", "status", "last_heartbeat_at"),
)

training_runs = Table(
    "training_runs",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("session_id", String(ID), ForeignKey("sessions.id"), nullable=False),
    Column("owner", String(OWNER), nullable=False),
    Column("base_model", String(NAME), nullable=False),
    Column("is_lora", Boolean, nullable=False),
    Column("lora_rank", Integer, nullable=False),
    Column("lora_alpha", Float, nullable=False),
    Column("lora_seed", BigInteger),
    Column("train_attn", Boolean, nullable=False),
    Column("train_mlp", Boolean, nullable=False),
    Column("train_unembed", Boolean, nullable=False),
    Column("optimizer_config", JSON, nullable=False),
    Column("user_metadata", JSON, nullable=False),
    Column("corrupted", Boolean, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("last_request_at", UtcDateTime, nullable=False),
    # The trainer holding the run (split deployment): it alone executes the run's requests while its heartbeat
    # keeps `workers.lease_expires_at` in the future. NULL in the one-process server, and for a run not placed yet.
    Column("trainer_id", String(ID)),
    Index("ix_training_runs_owner_created", "owner", "created_at", "id"),
    Index("ix_training_runs_session", "session_id"),
    Index("ix_training_runs_trainer", "trainer_id"),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("run_id", String(ID), ForeignKey("training_runs.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("name", String(NAME), nullable=False),
    # Copied from the run: listing a user's checkpoints must not need a join, and ownership never changes.
    Column("owner", String(OWNER), nullable=False),
    Column("size_bytes", BigInteger),
    Column("public", Boolean, nullable=False),
    Column("user_metadata", JSON, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime),
    PrimaryKeyConstraint("run_id", "kind", "name"),
    Index("ix_checkpoints_owner_created", "owner", "created_at"),
    Index("ix_checkpoints_run_created", "run_id", "created_at"),
    Index("ix_checkpoints_expires", "expires_at"),
)

samplers = Table(
    "samplers",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("session_id", String(ID), ForeignKey("sessions.id"), nullable=False),
    Column("owner", String(OWNER), nullable=False),
    Column("base_model", String(NAME), nullable=False),
    Column("model_path", Text),
    # No foreign key: a sampler may outlive a run it sampled from (e.g. a published checkpoint of another user).
    Column("run_id", String(ID)),
    Column("run_version", BigInteger),
    Column("created_at", UtcDateTime, nullable=False),
    Index("ix_samplers_session", "session_id"),
)

futures = Table(
    "futures",
    metadata,
    Column("request_id", String(ID), primary_key=True),
    Column("owner", String(OWNER), nullable=False),
    Column("model_id", String(ID), nullable=False),
    # BigInteger: cloned SamplingClients number their requests in blocks of 1e9 per clone.
    Column("seq_id", BigInteger),
    Column("kind", String(40), nullable=False),
    Column("ordered", Boolean, nullable=False),
    Column("state", String(16), nullable=False),
    Column("payload", LargeBinary),
    Column("result", LargeBinary),
    Column("error_message", Text),
    Column("error_category", String(16)),
    Column("token_count", BigInteger, nullable=False),
    Column("claimed_by", String(ID)),
    # a sampling request whose sampler was lost while it ran: that sampler's id (it is requeued once, then fails)
    Column("lost_by", String(ID)),
    Column("delivered_count", Integer, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("started_at", UtcDateTime),
    Column("finished_at", UtcDateTime),
    Column("delivered_at", UtcDateTime),
    # The idempotency key. Rows without a seq_id (NULL) never collide: NULLs are distinct in SQLite and PostgreSQL.
    UniqueConstraint("model_id", "seq_id", name="uq_futures_model_seq"),
    Index("ix_futures_claim", "state", "ordered", "model_id", "seq_id"),
    Index("ix_futures_finished", "state", "finished_at"),
)

# The metrics each finished forward_backward and optim_step returned, for curves (console, `tinkerd runs metrics`).
# Written in the transaction that completes the request. No foreign key: a row outlives nothing it needs, and a run
# deleted with its metrics left behind is harmless (only its owner could read them).
step_metrics = Table(
    "step_metrics",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),  # insertion order = completion order
    Column("run_id", String(ID), nullable=False),
    Column("owner", String(OWNER), nullable=False),
    Column("kind", String(40), nullable=False),
    Column("seq_id", BigInteger),
    Column("metrics", JSON, nullable=False),
    Column("loss_weight", Float),
    Column("recorded_at", UtcDateTime, nullable=False),
    Index("ix_step_metrics_run", "run_id", "id"),
)

# Per ordered model: the seq_id it will execute next. Kept apart from the futures rows so that purging old
# results can never rewind a model's sequence (which would leave its next request waiting forever).
model_cursors = Table(
    "model_cursors",
    metadata,
    Column("model_id", String(ID), primary_key=True),
    Column("next_seq", BigInteger, nullable=False),
)

# Processes of a split deployment (api, trainer, sampler), each registered at start and kept alive by heartbeats.
# A trainer's lease on its runs lasts while `lease_expires_at` is in the future.
workers = Table(
    "workers",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("host", String(NAME), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("base_models", JSON, nullable=False),
    Column("capacity", Integer, nullable=False),
    Column("health_url", Text),
    Column("started_at", UtcDateTime, nullable=False),
    Column("heartbeat_at", UtcDateTime, nullable=False),
    Column("lease_expires_at", UtcDateTime, nullable=False),
    Column("stopped_at", UtcDateTime),
    Index("ix_workers_role_lease", "role", "lease_expires_at"),
)

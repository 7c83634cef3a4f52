"""Checkpoint rows (the files themselves live in blob storage, named by the same tinker:// path).

Visibility: an owner sees their own checkpoints; everyone may read a published (public) one. Only the owner may
change or delete a checkpoint (others get 404, or 403 for a published one they can see).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, delete, func, insert, or_, select, update

from tinkerd.domain.errors import ConflictError, NotFoundError, PermissionDeniedError
from tinkerd.domain.ids import validate_owner
from tinkerd.domain.paths import CheckpointKind, TinkerPath, parse_tinker_path
from tinkerd.domain.records import Checkpoint, Clock, Page, utc_now
from tinkerd.store.codec import checkpoint_from_row, checkpoint_to_row
from tinkerd.store.db import Database
from tinkerd.store.pagination import check_page
from tinkerd.store.tables import checkpoints, training_runs

# Newest first; the key columns break ties so that pages never overlap or skip rows.
_ORDER = (
    checkpoints.c.created_at.desc(),
    checkpoints.c.run_id.desc(),
    checkpoints.c.kind.desc(),
    checkpoints.c.name.desc(),
)


def _at(path: TinkerPath) -> ColumnElement[bool]:
    return (checkpoints.c.run_id == path.run_id) & (checkpoints.c.kind == path.kind) & (checkpoints.c.name == path.name)


def _as_path(path: TinkerPath | str) -> TinkerPath:
    return path if isinstance(path, TinkerPath) else parse_tinker_path(path)


class CheckpointRepository:
    def __init__(self, db: Database, clock: Clock = utc_now) -> None:
        self._db = db
        self._clock = clock

    def add(self, checkpoint: Checkpoint, *, overwrite: bool = False) -> Checkpoint:
        """Record a saved checkpoint of a run the same owner owns.

        A checkpoint of the same path is replaced with `overwrite`, else ConflictError (save_state's default).
        """
        path = checkpoint.path  # validates run id, kind and name
        validate_owner(checkpoint.owner)
        row = checkpoint_to_row(checkpoint)

        def txn(conn: Connection) -> Checkpoint:
            run_owner = conn.execute(
                select(training_runs.c.owner).where(training_runs.c.id == checkpoint.run_id)
            ).scalar_one_or_none()
            if run_owner != checkpoint.owner:
                raise NotFoundError(f"unknown training run {checkpoint.run_id!r}")
            exists = conn.execute(select(checkpoints.c.name).where(_at(path))).first() is not None
            if exists and not overwrite:
                raise ConflictError(f"checkpoint {path} already exists; save with overwrite=True to replace it")
            if exists:
                conn.execute(update(checkpoints).where(_at(path)).values(row))
            else:
                conn.execute(insert(checkpoints).values(row))
            return checkpoint

        return self._db.write(txn)

    def get(self, path: TinkerPath | str, owner: str) -> Checkpoint:
        """The checkpoint if `owner` owns it or it is published; else NotFoundError."""
        parsed = _as_path(path)
        query = select(checkpoints).where(_at(parsed), or_(checkpoints.c.owner == owner, checkpoints.c.public))
        row = self._db.read(lambda conn: conn.execute(query).mappings().first())
        if row is None:
            raise NotFoundError(f"unknown checkpoint {parsed}")
        return checkpoint_from_row(row)

    def find(self, path: TinkerPath | str) -> Checkpoint | None:
        """The checkpoint at `path` whoever owns it, or None. For signed downloads only: there the URL's signature,
        made for someone allowed to read the checkpoint, is the authority rather than an API key."""
        query = select(checkpoints).where(_at(_as_path(path)))
        row = self._db.read(lambda conn: conn.execute(query).mappings().first())
        return None if row is None else checkpoint_from_row(row)

    def list_for_run(self, run_id: str, owner: str, *, limit: int = 100, offset: int = 0) -> Page[Checkpoint]:
        """A run's checkpoints, newest first: all of them for its owner, the published ones for anyone else.

        NotFoundError for a run that does not exist or shows `owner` nothing, so existence does not leak.
        """
        check_page(limit, offset)

        def txn(conn: Connection) -> Page[Checkpoint]:
            run_owner = conn.execute(
                select(training_runs.c.owner).where(training_runs.c.id == run_id)
            ).scalar_one_or_none()
            where = checkpoints.c.run_id == run_id
            if run_owner != owner:
                where = where & checkpoints.c.public
            page = self._page(conn, where, limit, offset)
            if run_owner is None or (run_owner != owner and page.total_count == 0):
                raise NotFoundError(f"unknown training run {run_id!r}")
            return page

        return self._db.read(txn)

    def list_for_owner(self, owner: str, *, limit: int = 100, offset: int = 0) -> Page[Checkpoint]:
        """All of an owner's checkpoints across runs, newest first."""
        check_page(limit, offset)
        return self._db.read(lambda conn: self._page(conn, checkpoints.c.owner == owner, limit, offset))

    def readable_with_base(self, owner: str, kind: CheckpointKind, *, limit: int = 100) -> list[tuple[Checkpoint, str]]:
        """The checkpoints of a kind that `owner` may read (their own, and everyone's published ones), newest
        first, each with the base model of its run: what a sampling client could be created from."""
        check_page(limit, 0)
        query = (
            select(checkpoints, training_runs.c.base_model)
            .join(training_runs, training_runs.c.id == checkpoints.c.run_id)
            .where(checkpoints.c.kind == kind, or_(checkpoints.c.owner == owner, checkpoints.c.public))
            .order_by(*_ORDER)
            .limit(limit)
        )

        def txn(conn: Connection) -> list[tuple[Checkpoint, str]]:
            return [(checkpoint_from_row(row), str(row["base_model"])) for row in conn.execute(query).mappings()]

        return self._db.read(txn)

    def latest(self, run_id: str, owner: str, kind: CheckpointKind) -> Checkpoint | None:
        """The run's newest checkpoint of a kind that `owner` may read (TrainingRun.last_checkpoint on the wire)."""
        query = (
            select(checkpoints)
            .where(
                checkpoints.c.run_id == run_id,
                checkpoints.c.kind == kind,
                or_(checkpoints.c.owner == owner, checkpoints.c.public),
            )
            .order_by(*_ORDER)
            .limit(1)
        )
        row = self._db.read(lambda conn: conn.execute(query).mappings().first())
        return None if row is None else checkpoint_from_row(row)

    def delete(self, path: TinkerPath | str, owner: str) -> Checkpoint:
        """Remove the row and return it, so the caller can delete the files."""
        parsed = _as_path(path)

        def txn(conn: Connection) -> Checkpoint:
            checkpoint = self._owned(conn, parsed, owner)
            conn.execute(delete(checkpoints).where(_at(parsed)))
            return checkpoint

        return self._db.write(txn)

    def set_public(self, path: TinkerPath | str, owner: str, public: bool) -> Checkpoint:
        return self._set(_as_path(path), owner, public=public)

    def set_expiry(self, path: TinkerPath | str, owner: str, expires_at: datetime | None) -> Checkpoint:
        """Set the time after which the checkpoint may be deleted, or clear it with None (keep forever)."""
        return self._set(_as_path(path), owner, expires_at=expires_at)

    def list_expired(self, *, limit: int = 100) -> list[Checkpoint]:
        """Checkpoints of every owner whose expiry has passed, soonest first, for the reaper (not for users)."""
        query = (
            select(checkpoints)
            .where(checkpoints.c.expires_at.is_not(None), checkpoints.c.expires_at <= self._clock())
            .order_by(checkpoints.c.expires_at, checkpoints.c.run_id, checkpoints.c.kind, checkpoints.c.name)
            .limit(limit)
        )
        return self._db.read(lambda conn: [checkpoint_from_row(row) for row in conn.execute(query).mappings()])

    def storage_usage(self, owner: str) -> tuple[int, int]:
        """(number of checkpoints, total bytes) that `owner` stores."""
        query = select(func.count(), func.coalesce(func.sum(checkpoints.c.size_bytes), 0)).where(
            checkpoints.c.owner == owner
        )
        count, size = self._db.read(lambda conn: conn.execute(query).one())
        return int(count), int(size)

    def _set(self, path: TinkerPath, owner: str, **values: Any) -> Checkpoint:
        def txn(conn: Connection) -> Checkpoint:
            self._owned(conn, path, owner)
            conn.execute(update(checkpoints).where(_at(path)).values(**values))
            return self._owned(conn, path, owner)

        return self._db.write(txn)

    @staticmethod
    def _owned(conn: Connection, path: TinkerPath, owner: str) -> Checkpoint:
        """The checkpoint if `owner` owns it; PermissionDeniedError for someone else's published one (they can see
        it, so "unknown" would mislead), NotFoundError otherwise (so existence does not leak)."""
        row = conn.execute(select(checkpoints).where(_at(path))).mappings().first()
        if row is None or (row["owner"] != owner and not row["public"]):
            raise NotFoundError(f"unknown checkpoint {path}")
        if row["owner"] != owner:
            raise PermissionDeniedError(f"checkpoint {path} belongs to another user; only its owner can change it")
        return checkpoint_from_row(row)

    @staticmethod
    def _page(conn: Connection, where: ColumnElement[bool], limit: int, offset: int) -> Page[Checkpoint]:
        total = conn.execute(select(func.count()).select_from(checkpoints).where(where)).scalar_one()
        rows = conn.execute(select(checkpoints).where(where).order_by(*_ORDER).limit(limit).offset(offset)).mappings()
        return Page(tuple(checkpoint_from_row(row) for row in rows), offset, limit, int(total))

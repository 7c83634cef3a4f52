"""Training runs. Reads are scoped to an owner; "accessible" also admits runs with a published checkpoint."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, Connection, bindparam, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from tinkerd.domain.errors import ConflictError, NotFoundError
from tinkerd.domain.ids import validate_owner, validate_run_id
from tinkerd.domain.records import Clock, Page, TrainingRun, utc_now
from tinkerd.store.codec import run_from_row, run_to_row
from tinkerd.store.db import Database
from tinkerd.store.pagination import check_page
from tinkerd.store.tables import checkpoints, sessions, training_runs


def _visible(owner: str, accessible: bool) -> ColumnElement[bool]:
    mine = training_runs.c.owner == owner
    if not accessible:
        return mine
    published = (
        select(checkpoints.c.run_id)
        .where(checkpoints.c.run_id == training_runs.c.id, checkpoints.c.public.is_(True))
        .exists()
    )
    return or_(mine, published)


# Every request to a run reads it: built once (building a statement costs more than running it).
_OWNED = select(training_runs).where(
    training_runs.c.id == bindparam("run_id"), training_runs.c.owner == bindparam("owner")
)


class RunRepository:
    def __init__(self, db: Database, clock: Clock = utc_now) -> None:
        self._db = db
        self._clock = clock

    def create(self, run: TrainingRun, *, exist_ok: bool = False) -> TrainingRun:
        """Store a new run. Its session must exist and belong to the same owner.

        With `exist_ok`, creating a run that already exists for the same owner returns the stored one (a retried
        create_model); otherwise ConflictError.
        """
        validate_run_id(run.id)
        validate_owner(run.owner)

        def txn(conn: Connection) -> TrainingRun:
            existing = conn.execute(select(training_runs).where(training_runs.c.id == run.id)).mappings().first()
            if existing is not None:
                if exist_ok and existing["owner"] == run.owner:
                    return run_from_row(existing)
                raise ConflictError(f"training run {run.id!r} already exists")
            session_owner = conn.execute(
                select(sessions.c.owner).where(sessions.c.id == run.session_id)
            ).scalar_one_or_none()
            if session_owner != run.owner:
                raise NotFoundError(f"unknown session {run.session_id!r}")
            conn.execute(insert(training_runs).values(run_to_row(run)))
            return run

        try:
            return self._db.write(txn)
        except IntegrityError:
            # A concurrent create of the same id won (PostgreSQL); answer as if we had seen its row.
            if not exist_ok:
                raise ConflictError(f"training run {run.id!r} already exists") from None
            return self.get(run.id, run.owner)

    def get(self, run_id: str, owner: str, *, accessible: bool = False) -> TrainingRun:
        """The run if `owner` owns it (or, with `accessible`, if it has a published checkpoint); else NotFoundError."""
        if accessible:
            query = select(training_runs).where(training_runs.c.id == run_id, _visible(owner, accessible))
            row = self._db.read(lambda conn: conn.execute(query).mappings().first())
        else:
            params = {"run_id": run_id, "owner": owner}
            row = self._db.read(lambda conn: conn.execute(_OWNED, params).mappings().first())
        if row is None:
            raise NotFoundError(f"unknown training run {run_id!r}")
        return run_from_row(row)

    def list_for_owner(
        self, owner: str, *, limit: int = 20, offset: int = 0, accessible: bool = False, project_id: str | None = None
    ) -> Page[TrainingRun]:
        """Newest first; with ``project_id``, only the runs of sessions in that project."""
        check_page(limit, offset)
        where = _visible(owner, accessible)
        if project_id is not None:
            in_project = select(sessions.c.id).where(sessions.c.project_id == project_id)
            where = where & training_runs.c.session_id.in_(in_project)

        def txn(conn: Connection) -> Page[TrainingRun]:
            total = conn.execute(select(func.count()).select_from(training_runs).where(where)).scalar_one()
            rows = conn.execute(
                select(training_runs)
                .where(where)
                .order_by(training_runs.c.created_at.desc(), training_runs.c.id.desc())
                .limit(limit)
                .offset(offset)
            ).mappings()
            return Page(tuple(run_from_row(row) for row in rows), offset, limit, int(total))

        return self._db.read(txn)

    def ids_for_session(self, session_id: str, owner: str) -> list[str]:
        """The session's run ids in creation order (for the session view)."""
        query = (
            select(training_runs.c.id)
            .where(training_runs.c.session_id == session_id, training_runs.c.owner == owner)
            .order_by(training_runs.c.created_at, training_runs.c.id)
        )
        return self._db.read(lambda conn: list(conn.execute(query).scalars()))

    def touch(self, run_id: str, owner: str, at: datetime | None = None) -> None:
        """Record that the run received a request (TrainingRun.last_request_at)."""
        self._update(run_id, owner, last_request_at=at or self._clock())

    def mark_corrupted(self, run_id: str, owner: str, corrupted: bool = True) -> None:
        """Flag a run whose state can no longer be trusted (e.g. a failed optimizer step left it half-updated)."""
        self._update(run_id, owner, corrupted=corrupted)

    def _update(self, run_id: str, owner: str, **values: object) -> None:
        statement = (
            update(training_runs).where(training_runs.c.id == run_id, training_runs.c.owner == owner).values(**values)
        )
        if self._db.write(lambda conn: conn.execute(statement).rowcount) == 0:
            raise NotFoundError(f"unknown training run {run_id!r}")

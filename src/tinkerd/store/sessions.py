"""Client sessions: created by `create_session`, kept alive by heartbeats, closed by `finish` or by silence."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from tinkerd.domain.errors import ConflictError, InvalidRequestError, NotFoundError
from tinkerd.domain.ids import validate_owner, validate_session_id
from tinkerd.domain.records import Clock, FinishReason, Page, Session, SessionStatus, utc_now
from tinkerd.store.codec import session_from_row, session_to_row
from tinkerd.store.db import Database
from tinkerd.store.pagination import check_page
from tinkerd.store.tables import sessions

_FINISH_REASONS: tuple[FinishReason, ...] = ("success", "errored", "interrupted")


class SessionRepository:
    def __init__(self, db: Database, clock: Clock = utc_now) -> None:
        self._db = db
        self._clock = clock

    def create(self, session: Session) -> Session:
        validate_session_id(session.id)
        validate_owner(session.owner)
        try:
            self._db.write(lambda conn: conn.execute(insert(sessions).values(session_to_row(session))))
        except IntegrityError:
            raise ConflictError(f"session {session.id!r} already exists") from None
        return session

    def get(self, session_id: str, owner: str) -> Session:
        return self._db.read(lambda conn: self._get(conn, session_id, owner))

    def list_for_owner(self, owner: str, *, limit: int = 20, offset: int = 0) -> Page[Session]:
        """Newest first."""
        check_page(limit, offset)
        where = sessions.c.owner == owner

        def txn(conn: Connection) -> Page[Session]:
            total = conn.execute(select(func.count()).select_from(sessions).where(where)).scalar_one()
            rows = conn.execute(
                select(sessions)
                .where(where)
                .order_by(sessions.c.created_at.desc(), sessions.c.id.desc())
                .limit(limit)
                .offset(offset)
            ).mappings()
            return Page(tuple(session_from_row(row) for row in rows), offset, limit, int(total))

        return self._db.read(txn)

    def set_project(self, session_id: str, owner: str, project_id: str) -> Session:
        """Move a session (and with it its runs and samplers, which belong to it) into a project."""

        def txn(conn: Connection) -> Session:
            self._get(conn, session_id, owner)
            conn.execute(update(sessions).where(sessions.c.id == session_id).values(project_id=project_id))
            return self._get(conn, session_id, owner)

        return self._db.write(txn)

    def newest_first(
        self, owner: str, *, before: tuple[datetime, str] | None = None, batch: int = 200
    ) -> Iterator[Session]:
        """The owner's sessions, newest first (ties by id, descending), starting after ``before`` (created_at, id):
        read in batches, so a caller filtering them stops reading once it has a page."""
        while True:
            where = sessions.c.owner == owner
            if before is not None:
                at, last_id = before
                where = where & (
                    (sessions.c.created_at < at) | ((sessions.c.created_at == at) & (sessions.c.id < last_id))
                )
            query = (
                select(sessions).where(where).order_by(sessions.c.created_at.desc(), sessions.c.id.desc()).limit(batch)
            )
            rows = self._db.read(lambda conn, q=query: [session_from_row(r) for r in conn.execute(q).mappings()])
            yield from rows
            if len(rows) < batch:
                return
            before = (rows[-1].created_at, rows[-1].id)

    def heartbeat(self, session_id: str, owner: str) -> Session:
        """Record a heartbeat and return the session. A closed session is returned unchanged: the api answers
        410 to it, which stops the SDK's heartbeat loop."""

        def txn(conn: Connection) -> Session:
            session = self._get(conn, session_id, owner)
            if session.closed:
                return session
            conn.execute(update(sessions).where(sessions.c.id == session_id).values(last_heartbeat_at=self._clock()))
            return self._get(conn, session_id, owner)

        return self._db.write(txn)

    def finish(self, session_id: str, owner: str, reason: FinishReason, detail: str | None = None) -> Session:
        """The client closed the session. Idempotent: finishing a closed session returns it unchanged."""
        if reason not in _FINISH_REASONS:
            raise InvalidRequestError(f"finish reason must be one of {', '.join(_FINISH_REASONS)}; got {reason!r}")
        return self._close(session_id, owner, "finished", reason, detail)

    def time_out(self, session_id: str, owner: str, detail: str) -> Session:
        """Close a session whose client stopped sending heartbeats."""
        return self._close(session_id, owner, "timed_out", None, detail)

    def find_silent(self, silent_for: timedelta, *, limit: int = 100) -> list[Session]:
        """Active sessions of every owner with no heartbeat for `silent_for`, for the reaper (not for users)."""
        cutoff: datetime = self._clock() - silent_for
        query = (
            select(sessions)
            .where(sessions.c.status == "active", sessions.c.last_heartbeat_at < cutoff)
            .order_by(sessions.c.last_heartbeat_at, sessions.c.id)
            .limit(limit)
        )
        return self._db.read(lambda conn: [session_from_row(row) for row in conn.execute(query).mappings()])

    def _close(
        self,
        session_id: str,
        owner: str,
        status: SessionStatus,
        reason: FinishReason | None,
        detail: str | None,
    ) -> Session:
        def txn(conn: Connection) -> Session:
            session = self._get(conn, session_id, owner)
            if session.closed:
                return session
            conn.execute(
                update(sessions)
                .where(sessions.c.id == session_id)
                .values(status=status, finish_reason=reason, status_detail=detail, closed_at=self._clock())
            )
            return self._get(conn, session_id, owner)

        return self._db.write(txn)

    @staticmethod
    def _get(conn: Connection, session_id: str, owner: str) -> Session:
        row = (
            conn.execute(select(sessions).where(sessions.c.id == session_id, sessions.c.owner == owner))
            .mappings()
            .first()
        )
        if row is None:
            raise NotFoundError(f"unknown session {session_id!r}")
        return session_from_row(row)

"""Sampling sessions (`create_sampling_session`, `save_weights_and_get_sampling_client`)."""

from __future__ import annotations

from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import IntegrityError

from tinkerd.domain.errors import ConflictError, InvalidRequestError, NotFoundError
from tinkerd.domain.ids import validate_owner, validate_sampler_id
from tinkerd.domain.paths import parse_tinker_path
from tinkerd.domain.records import Sampler
from tinkerd.store.codec import sampler_from_row, sampler_to_row
from tinkerd.store.db import Database
from tinkerd.store.tables import samplers, sessions


class SamplerRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, sampler: Sampler, *, exist_ok: bool = False) -> Sampler:
        """Store a sampler of an existing session of the same owner.

        With `exist_ok`, an existing sampler of the same id and owner is returned (a retried request)."""
        validate_sampler_id(sampler.id)
        validate_owner(sampler.owner)
        if sampler.model_path is not None:
            parse_tinker_path(sampler.model_path)
        if (sampler.run_id is None) != (sampler.run_version is None):
            raise InvalidRequestError("a sampler of a live run needs both run_id and run_version")

        def txn(conn: Connection) -> Sampler:
            existing = conn.execute(select(samplers).where(samplers.c.id == sampler.id)).mappings().first()
            if existing is not None:
                if exist_ok and existing["owner"] == sampler.owner:
                    return sampler_from_row(existing)
                raise ConflictError(f"sampler {sampler.id!r} already exists")
            session_owner = conn.execute(
                select(sessions.c.owner).where(sessions.c.id == sampler.session_id)
            ).scalar_one_or_none()
            if session_owner != sampler.owner:
                raise NotFoundError(f"unknown session {sampler.session_id!r}")
            conn.execute(insert(samplers).values(sampler_to_row(sampler)))
            return sampler

        try:
            return self._db.write(txn)
        except IntegrityError:
            if not exist_ok:
                raise ConflictError(f"sampler {sampler.id!r} already exists") from None
            return self.get(sampler.id, sampler.owner)

    def get(self, sampler_id: str, owner: str) -> Sampler:
        query = select(samplers).where(samplers.c.id == sampler_id, samplers.c.owner == owner)
        row = self._db.read(lambda conn: conn.execute(query).mappings().first())
        if row is None:
            raise NotFoundError(f"unknown sampler {sampler_id!r}")
        return sampler_from_row(row)

    def ids_for_session(self, session_id: str, owner: str) -> list[str]:
        """The session's sampler ids in creation order (for the session view)."""
        query = (
            select(samplers.c.id)
            .where(samplers.c.session_id == session_id, samplers.c.owner == owner)
            .order_by(samplers.c.created_at, samplers.c.id)
        )
        return self._db.read(lambda conn: list(conn.execute(query).scalars()))

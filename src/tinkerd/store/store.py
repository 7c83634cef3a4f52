"""One object holding the database and every repository, built once by the composition root."""

from __future__ import annotations

from dataclasses import dataclass

from tinkerd.domain.records import Clock, utc_now
from tinkerd.store.admission import Admission
from tinkerd.store.checkpoints import CheckpointRepository
from tinkerd.store.db import Database, RetryPolicy
from tinkerd.store.futures import FuturesLedger
from tinkerd.store.metrics import MetricsRepository
from tinkerd.store.overview import Overview
from tinkerd.store.runs import RunRepository
from tinkerd.store.samplers import SamplerRepository
from tinkerd.store.sessions import SessionRepository


@dataclass(frozen=True)
class Store:
    db: Database
    futures: FuturesLedger
    runs: RunRepository
    sessions: SessionRepository
    checkpoints: CheckpointRepository
    samplers: SamplerRepository
    admission: Admission
    metrics: MetricsRepository
    overview: Overview

    @classmethod
    def open(
        cls,
        url: str,
        *,
        clock: Clock = utc_now,
        busy_timeout_ms: int = 5000,
        retry: RetryPolicy | None = None,
        create_schema: bool = True,
    ) -> Store:
        """Connect to `url` (e.g. `sqlite:///<data_dir>/tinkerd.db`) and, by default, create missing tables."""
        db = Database(url, busy_timeout_ms=busy_timeout_ms, retry=retry)
        if create_schema:
            db.create_schema()
        return cls(
            db=db,
            futures=FuturesLedger(db, clock),
            runs=RunRepository(db, clock),
            sessions=SessionRepository(db, clock),
            checkpoints=CheckpointRepository(db, clock),
            samplers=SamplerRepository(db),
            admission=Admission(db, clock),
            metrics=MetricsRepository(db),
            overview=Overview(db),
        )

    def close(self) -> None:
        self.db.dispose()

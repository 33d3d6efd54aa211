"""How long usage rows are kept: ``--usage-retention`` (30 days). Older rows are deleted in
small batches by a background thread (a greenlet under gevent), a pause between batches:
no long lock in PostgreSQL (autovacuum keeps up with small deletes), no long stall of the
event loop with SQLite. The per-day sums per key and model (``usage_daily``), written with
the rows, are kept for good: reports read them for the days before the cut-off.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from datetime import datetime, timedelta
from typing import Callable

from sqlalchemy import Engine, delete, select

from app.access.keys import now
from app.access.tables import usage

log = logging.getLogger("flaskchat.usage")
PRUNE_EVERY = 3600.0  # seconds between prunes
FIRST_PRUNE = (1.0, 5.0)  # seconds after start (at random: processes spread out)
BATCH = 1000  # rows per delete (a few milliseconds each)
PAUSE = 0.05  # seconds between two deletes


def cutoff(at: datetime, retention: float) -> datetime:
    """The first instant whose rows are kept: the start (UTC) of the day that lies
    ``retention`` seconds before ``at``. Whole days are pruned, so that a report can take
    the days before it from the per-day sums and the rest from the rows."""
    edge = at - timedelta(seconds=retention)
    return edge.replace(hour=0, minute=0, second=0, microsecond=0)


class Pruner:
    def __init__(self, engine: Engine, retention: float,
                 clock: Callable[[], datetime] = now,
                 pause: Callable[[float], None] = time.sleep) -> None:
        self._engine = engine
        self.retention = retention
        self._clock = clock
        self._pause = pause

    def start(self) -> None:
        threading.Thread(target=self._run, name="usage-pruner", daemon=True).start()

    def _run(self) -> None:
        self._pause(random.uniform(*FIRST_PRUNE))
        while True:
            try:
                self.prune()
            except Exception as exc:  # the database's failures: try again next time
                log.error("cannot prune old usage records: %s",
                          " ".join(str(exc).split())[:300])
            self._pause(PRUNE_EVERY)

    def prune(self) -> int:
        """Deletes the rows older than the cut-off, a batch at a time; how many."""
        edge = cutoff(self._clock(), self.retention)
        oldest = select(usage.c.id).where(usage.c.created_at < edge).limit(BATCH)
        total = 0
        while True:
            with self._engine.begin() as connection:
                deleted = connection.execute(
                    delete(usage).where(usage.c.id.in_(oldest.scalar_subquery()))).rowcount
            total += deleted
            if deleted < BATCH:
                break
            self._pause(PAUSE)
        if total:
            log.info("pruned %d usage records from before %s (their per-day sums stay)",
                     total, edge.isoformat(sep=" "))
        return total

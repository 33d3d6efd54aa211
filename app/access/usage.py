"""The usage ledger: one record per request, written in batches off the request's path.

Requests append to a bounded buffer; a background thread (a greenlet under gevent) writes
it every ``flush_interval`` seconds in one transaction: the rows, and the per-day sums that
budgets and reports read. A graceful stop flushes what is left, so SIGTERM loses nothing;
SIGKILL loses at most one interval. While the database cannot be written, records wait in
the buffer (bounded: when it is full, the oldest are dropped, and that is logged and
counted) and are written when it is back.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Iterable, Protocol

from sqlalchemy import Engine, insert
from sqlalchemy.dialects import postgresql, sqlite

from app.access.tables import usage, usage_daily

log = logging.getLogger("flaskchat.usage")


@dataclass  # not frozen: a frozen dataclass's __init__ costs several times more per request
class UsageRecord:
    created_at: datetime  # naive UTC
    key_id: str | None
    key_name: str | None
    team: str | None
    model: str | None
    route: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    ttft_ms: float | None
    request_id: str


class LedgerObserver(Protocol):
    """Hears how the ledger fares (the gateway's metrics)."""

    def buffered(self, records: int) -> None: ...
    def dropped(self, records: int) -> None: ...


class UsageLedger:
    def __init__(self, engine: Engine, flush_interval: float = 1.0,
                 max_buffer: int = 100_000, observer: LedgerObserver | None = None,
                 written: Callable[[list[UsageRecord]], None] | None = None) -> None:
        """``written`` hears of each batch once it is in the database."""
        self._engine = engine
        self._insert_rows = insert(usage)
        self._add_to_days = _add_to_days(engine.dialect.name)
        self._interval = flush_interval
        self._buffer: deque[UsageRecord] = deque()
        self._max = max_buffer
        self._observer = observer
        self._written = written
        self._flushing = threading.Lock()
        self._stopped = threading.Event()
        self._failing = False

    def add(self, record: UsageRecord) -> None:
        self._buffer.append(record)
        if len(self._buffer) > self._max:
            self._trim()

    def start(self) -> None:
        threading.Thread(target=self._run, name="usage-ledger", daemon=True).start()

    def stop(self, timeout: float = 10.0) -> bool:
        """On a graceful stop: no more periodic writes; what is buffered is written now,
        retried for up to ``timeout`` seconds if the database refuses."""
        self._stopped.set()
        deadline = time.monotonic() + timeout
        while not self.flush():
            if time.monotonic() > deadline:
                log.error("stopping with %d usage records unwritten", len(self._buffer))
                return False
            time.sleep(0.2)
        return True

    def flush(self) -> bool:
        """Writes everything buffered; False if the database refused (it stays buffered)."""
        with self._flushing:
            batch = list(self._buffer)
            if not batch:
                return True
            self._buffer.clear()  # records added while this writes wait for the next one
            try:
                self._write(batch)
            except Exception as exc:  # any database failure: keep the records, try again
                self._buffer.extendleft(reversed(batch))
                self._trim()
                if not self._failing:
                    log.error("cannot write usage (%d records kept for later): %s",
                              len(batch), " ".join(str(exc).split())[:300])
                self._failing = True
                self._report()
                return False
            if self._failing:
                log.warning("usage written again (%d records)", len(batch))
                self._failing = False
        self._report()
        if self._written is not None:
            self._written(batch)
        return True

    def _trim(self) -> None:
        extra = len(self._buffer) - self._max
        if extra > 0:
            for _ in range(extra):
                self._buffer.popleft()
            log.error("usage buffer full (%d records): dropped the %d oldest", self._max,
                      extra)
            if self._observer is not None:
                self._observer.dropped(extra)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            self.flush()

    def _report(self) -> None:
        if self._observer is not None:
            self._observer.buffered(len(self._buffer))

    def _write(self, batch: list[UsageRecord]) -> None:
        # Two executemany calls of statements built once (SQLAlchemy caches their SQL):
        # a statement per row or per day would cost more CPU than the requests it counts.
        rows = [vars(record) for record in batch]
        with self._engine.begin() as connection:
            connection.execute(self._insert_rows, rows)
            connection.execute(self._add_to_days, _daily(batch))


def _add_to_days(dialect_name: str) -> Any:
    """An upsert of per-day sums (executed with many rows at once)."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    statement = dialect.insert(usage_daily)
    table = usage_daily.c
    return statement.on_conflict_do_update(
        index_elements=[table.day, table.key_id, table.model],
        set_={"requests": table.requests + statement.excluded.requests,
              "prompt_tokens": table.prompt_tokens + statement.excluded.prompt_tokens,
              "completion_tokens": table.completion_tokens
              + statement.excluded.completion_tokens,
              "team": statement.excluded.team})


def _daily(batch: Iterable[UsageRecord]) -> list[dict[str, Any]]:
    """The batch summed per (day, key, model)."""
    sums: dict[tuple[str, str, str], dict[str, Any]] = {}
    for record in batch:
        day = record.created_at.strftime("%Y-%m-%d")
        group = (day, record.key_id or "", record.model or "")
        entry = sums.get(group)
        if entry is None:
            entry = sums[group] = {"day": day, "key_id": group[1], "model": group[2],
                                   "team": record.team, "requests": 0, "prompt_tokens": 0,
                                   "completion_tokens": 0}
        entry["requests"] += 1
        entry["prompt_tokens"] += record.prompt_tokens
        entry["completion_tokens"] += record.completion_tokens
    return list(sums.values())

"""The usage ledger: one record per request, written in batches off the request's path.

Requests append to a bounded buffer; a background thread (a greenlet under gevent) writes
it every ``flush_interval`` seconds in one transaction: the rows, and the per-day sums per
key and model that budgets, reports and the admin chart read (kept for good, while the
rows themselves are kept for ``retention``: see ``app.access.retention``). A graceful stop
flushes what is left, so SIGTERM loses nothing; SIGKILL loses at most one interval. While
the database cannot be written, records wait in the buffer (bounded: when it is full, the
oldest are dropped, and that is logged and counted) and are written when it is back. A
batch the database refuses while it answers holds a row it rejects: each row is then
written alone, and only the rejected ones are dropped (logged and counted).
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Iterable, Protocol

from sqlalchemy import Engine, insert
from sqlalchemy.dialects import postgresql, sqlite

from app.access.database import answers, reason, write_before_stopping
from app.access.tables import usage, usage_daily
from app.telemetry import tracing

log = logging.getLogger("flaskchat.usage")
MAX_INT = 2**31 - 1  # what an Integer column holds everywhere
_LENGTHS: dict[str, int] = {column.name: getattr(column.type, "length")
                            for column in usage.columns
                            if getattr(column.type, "length", None)}


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
    span: Any = None  # the request's traced root (trace id, span id): the write links to it


class LedgerObserver(Protocol):
    """Hears how the ledger fares (the gateway's metrics)."""

    def buffered(self, records: int) -> None: ...
    def dropped(self, records: int) -> None: ...
    def rejected(self, records: int) -> None: ...


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

    def stop(self) -> bool:
        """On a graceful stop: no more periodic writes; what is buffered is written now,
        retried for a while if the database refuses."""
        self._stopped.set()
        return write_before_stopping(self.flush, lambda: len(self._buffer), "usage records")

    def flush(self) -> bool:
        """Writes everything buffered; False if the database cannot be written (it stays
        buffered)."""
        with self._flushing:
            batch = list(self._buffer)
            if not batch:
                return True
            self._buffer.clear()  # records added while this writes wait for the next one
            try:
                with tracing.background("usage write", [r.span for r in batch],
                                        {"flaskchat.usage.records": len(batch),
                                         "db.system": self._engine.dialect.name}):
                    self._write(batch)
            except Exception as exc:  # any database failure: see whether it is a row's
                if not answers(self._engine):
                    self._keep(batch, exc)
                    return False
                batch, whole = self._write_alone(batch, exc)
                if not whole:  # the database went away meanwhile: the rest is kept
                    if self._written is not None:
                        self._written(batch)
                    return False
            if self._failing:
                log.warning("usage written again (%d records)", len(batch))
                self._failing = False
        self._report()
        if self._written is not None:
            self._written(batch)
        return True

    def _keep(self, batch: list[UsageRecord], exc: Exception) -> None:
        """The database is down: the batch waits for the next try."""
        self._buffer.extendleft(reversed(batch))
        self._trim()
        if not self._failing:
            log.error("cannot write usage (%d records kept for later): %s", len(batch),
                      reason(exc))
        self._failing = True
        self._report()

    def _write_alone(self, batch: list[UsageRecord],
                     exc: Exception) -> tuple[list[UsageRecord], bool]:
        """The database answers but refused the batch: each record goes in alone, and
        those it rejects are dropped. Returns the records written, and False if the
        database went away before the end (the rest is kept for the next flush)."""
        written, rejected = [], []
        for position, record in enumerate(batch):
            try:
                self._write([record])
                written.append(record)
            except Exception as alone:  # this record's fault, or the database's
                if not answers(self._engine):
                    self._keep(batch[position:], alone)
                    return written, False
                rejected.append(record)
                log.error("the database rejected the usage record of request %s (dropped): "
                          "%s", record.request_id, reason(alone))
        if rejected:
            log.error("a usage batch held %d record(s) the database rejects (first error: "
                      "%s); the other %d were written", len(rejected), reason(exc),
                      len(written))
            if self._observer is not None:
                self._observer.rejected(len(rejected))
        return written, True

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
        rows = [_row(record) for record in batch]
        with self._engine.begin() as connection:
            connection.execute(self._insert_rows, rows)
            connection.execute(self._add_to_days, _daily(rows))


def _row(record: UsageRecord) -> dict[str, Any]:
    """The record as the table holds it: counts within an Integer, text within its column
    and without NUL (which PostgreSQL refuses), whatever a worker or upstream reported."""
    row = vars(record).copy()
    for name in ("prompt_tokens", "completion_tokens", "status"):
        value = row[name]
        row[name] = value if 0 <= value <= MAX_INT else (0 if value < 0 else MAX_INT)
    for name, length in _LENGTHS.items():
        value = row[name]
        if value is not None and (len(value) > length or "\0" in value):
            row[name] = value.replace("\0", "")[:length]
    return row


def _add_to_days(dialect_name: str) -> Any:
    """An upsert of per-day sums (executed with many rows at once)."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    statement = dialect.insert(usage_daily)
    table = usage_daily.c
    added = statement.excluded
    return statement.on_conflict_do_update(
        index_elements=[table.day, table.key_id, table.model],
        set_={"requests": table.requests + added.requests,
              "errors": table.errors + added.errors,
              "prompt_tokens": table.prompt_tokens + added.prompt_tokens,
              "completion_tokens": table.completion_tokens + added.completion_tokens,
              "latency_ms": table.latency_ms + added.latency_ms,
              "team": added.team, "key_name": added.key_name})


def _daily(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows summed per (day, key, model)."""
    sums: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        day = row["created_at"].strftime("%Y-%m-%d")
        group = (day, row["key_id"] or "", row["model"] or "")
        entry = sums.get(group)
        if entry is None:
            entry = sums[group] = {"day": day, "key_id": group[1], "model": group[2],
                                   "team": row["team"], "key_name": row["key_name"],
                                   "requests": 0, "errors": 0, "prompt_tokens": 0,
                                   "completion_tokens": 0, "latency_ms": 0.0}
        entry["requests"] += 1
        entry["errors"] += row["status"] >= 400
        entry["prompt_tokens"] += row["prompt_tokens"]
        entry["completion_tokens"] += row["completion_tokens"]
        entry["latency_ms"] += row["latency_ms"]
    return list(sums.values())

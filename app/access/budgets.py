"""Token budgets per day or month (UTC): what a key spent is the database's per-day sums,
read with every refresh of the key directory (so every host sees every host's spending,
a refresh behind), plus what this process charged since."""
from __future__ import annotations

from datetime import datetime
from typing import Iterable

from sqlalchemy import Engine, func, select

from app.access.tables import usage_daily
from app.access.usage import UsageRecord


def period_start(period: str | None, at: datetime) -> str:
    """The first day (YYYY-MM-DD) of the budget period that ``at`` (UTC) falls in."""
    return at.strftime("%Y-%m-01" if period == "month" else "%Y-%m-%d")


class Budgets:
    """What each key spent this period: the database's sums as last read, plus what this
    process charged since that is not (surely) in that read.

    A charge is pending until the ledger writes its record; a written batch still counts
    on top of the sums until a read that began after it was written replaces them (a
    batch written during a read may or may not be in it: counting it twice for one refresh
    refuses a little early, which is the safe side of a budget)."""

    def __init__(self) -> None:
        self._spent: dict[str, int] = {}  # key id -> tokens this period, as last read
        self._pending: dict[str, int] = {}  # key id -> tokens charged here, not yet written
        self._written: list[tuple[int, dict[str, int]]] = []  # (batch number, tokens)
        self._batches = 0

    def spent(self, key_id: str) -> int:
        total = self._spent.get(key_id, 0) + self._pending.get(key_id, 0)
        for _, tokens in self._written:
            total += tokens.get(key_id, 0)
        return total

    def charge(self, key_id: str, tokens: int) -> None:
        self._pending[key_id] = self._pending.get(key_id, 0) + tokens

    def written(self, records: Iterable[UsageRecord]) -> None:
        """The ledger wrote these records: their charges move from pending to written."""
        if not self._pending:
            return
        moved: dict[str, int] = {}
        for record in records:
            key_id = record.key_id
            if key_id is not None and key_id in self._pending:
                tokens = min(record.prompt_tokens + record.completion_tokens,
                             self._pending[key_id])
                self._pending[key_id] -= tokens
                moved[key_id] = moved.get(key_id, 0) + tokens
        self._batches += 1
        if moved:
            self._written.append((self._batches, moved))

    def mark(self) -> int:
        """Taken just before the database is read; given back to ``reload``."""
        return self._batches

    def reload(self, spent: dict[str, int], mark: int) -> None:
        self._spent = spent
        self._written = [batch for batch in self._written if batch[0] > mark]


def read_spent(engine: Engine, keys: Iterable[tuple[str, str]], at: datetime) -> dict[str, int]:
    """Tokens spent this period by each (key id, period) given."""
    starts: dict[str, list[str]] = {}
    for key_id, period in keys:
        starts.setdefault(period_start(period, at), []).append(key_id)
    spent: dict[str, int] = {}
    total = func.sum(usage_daily.c.prompt_tokens + usage_daily.c.completion_tokens)
    with engine.connect() as connection:
        for start, key_ids in starts.items():
            rows = connection.execute(
                select(usage_daily.c.key_id, total)
                .where(usage_daily.c.key_id.in_(key_ids), usage_daily.c.day >= start)
                .group_by(usage_daily.c.key_id))
            spent.update({key_id: int(tokens or 0) for key_id, tokens in rows})
    return spent

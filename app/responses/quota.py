"""What each owner (an API key) keeps of stored responses, in bytes and in count, and the
pruning that holds it to its quota: past either, the owner's oldest responses are deleted
first (as the store's overall cap does), so one key can never fill the database that
every key's usage and keys live in, nor push another key's responses out of the store's
overall cap by the count of its own.

An owner's bytes and count are summed by the database once, then counted here as its
responses are written, and summed again every ``RECOUNT`` seconds (other processes and
hosts write too): an owner may pass its quota by what the others wrote since, until the
next count.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from sqlalchemy import Connection, delete, func, select

from app.access.tables import responses

RECOUNT = 60.0  # seconds before an owner's responses are summed by the database again


class OwnerQuota:
    def __init__(self, quota_bytes: int, max_count: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.quota = quota_bytes
        self.max_count = max_count
        self._clock = clock
        # owner -> (bytes, count, when summed by the database)
        self._kept: dict[str, tuple[int, int, float]] = {}

    def written(self, connection: Connection, sizes: Iterable[tuple[str, int]]) -> None:
        """A batch was written (in ``connection``'s transaction): (owner, bytes) each.
        Owners now past their quota lose their oldest responses."""
        added: dict[str, list[int]] = {}
        for owner, size in sizes:
            entry = added.setdefault(owner, [0, 0])
            entry[0] += size
            entry[1] += 1
        now = self._clock()
        for owner, (size, count) in added.items():
            known = self._kept.get(owner)
            if known is None or now - known[2] > RECOUNT:
                total, number, counted_at = *self._sum(connection, owner), now  # batch in
            else:
                total, number, counted_at = known[0] + size, known[1] + count, known[2]
            if total > self.quota or number > self.max_count:
                self._prune(connection, owner)
                total, number, counted_at = *self._sum(connection, owner), now
            self._kept[owner] = (total, number, counted_at)

    def forget(self, owner: str) -> None:
        """The owner's responses changed otherwise (one deleted): sum them again."""
        self._kept.pop(owner, None)

    @staticmethod
    def _sum(connection: Connection, owner: str) -> tuple[int, int]:
        found = connection.execute(
            select(func.coalesce(func.sum(responses.c.bytes), 0), func.count())
            .where(responses.c.owner == owner)).one()
        return int(found[0]), int(found[1])

    def _prune(self, connection: Connection, owner: str) -> None:
        """Deletes the owner's oldest responses until the newer ones fit its quota."""
        newest_first = (responses.c.created_at.desc(), responses.c.id.desc())
        ranked = select(responses.c.id,
                        func.sum(responses.c.bytes).over(order_by=newest_first)
                        .label("newer_bytes"),
                        func.row_number().over(order_by=newest_first).label("place")) \
            .where(responses.c.owner == owner).subquery()
        past = select(ranked.c.id).where((ranked.c.newer_bytes > self.quota)
                                         | (ranked.c.place > self.max_count))
        connection.execute(delete(responses).where(responses.c.id.in_(past)))

"""What each owner (an API key) keeps of stored responses, in bytes, and the pruning that
holds it to its quota: past it, the owner's oldest responses are deleted first (as the
store's overall cap does), so one key can never fill the database that every key's
usage and keys live in, and never touches another key's responses.

The bytes per owner are summed by the database once, then counted here as responses are
written, and summed again every ``RECOUNT`` seconds (other processes and hosts write
too): an owner may pass its quota by what the others wrote since, until the next count.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from sqlalchemy import Connection, delete, func, select

from app.access.tables import responses

RECOUNT = 60.0  # seconds before an owner's bytes are summed by the database again


class OwnerQuota:
    def __init__(self, quota_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.quota = quota_bytes
        self._clock = clock
        self._bytes: dict[str, tuple[int, float]] = {}  # owner -> (bytes, when summed)

    def written(self, connection: Connection, sizes: Iterable[tuple[str, int]]) -> None:
        """A batch was written (in ``connection``'s transaction): (owner, bytes) each.
        Owners now past their quota lose their oldest responses."""
        added: dict[str, int] = {}
        for owner, size in sizes:
            added[owner] = added.get(owner, 0) + size
        now = self._clock()
        for owner, size in added.items():
            known = self._bytes.get(owner)
            if known is None or now - known[1] > RECOUNT:
                total, counted_at = self._sum(connection, owner), now  # this batch in it
            else:
                total, counted_at = known[0] + size, known[1]
            if total > self.quota:
                self._prune(connection, owner)
                total, counted_at = self._sum(connection, owner), now
            self._bytes[owner] = (total, counted_at)

    def forget(self, owner: str) -> None:
        """The owner's responses changed otherwise (one deleted): sum them again."""
        self._bytes.pop(owner, None)

    @staticmethod
    def _sum(connection: Connection, owner: str) -> int:
        return int(connection.execute(select(func.coalesce(func.sum(responses.c.bytes), 0))
                                      .where(responses.c.owner == owner)).scalar_one())

    def _prune(self, connection: Connection, owner: str) -> None:
        """Deletes the owner's oldest responses until the newer ones fit the quota."""
        newer = func.sum(responses.c.bytes).over(
            order_by=(responses.c.created_at.desc(), responses.c.id.desc()))
        ranked = select(responses.c.id, newer.label("newer")) \
            .where(responses.c.owner == owner).subquery()
        past = select(ranked.c.id).where(ranked.c.newer > self.quota)
        connection.execute(delete(responses).where(responses.c.id.in_(past)))

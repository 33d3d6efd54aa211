"""One server's slots and the requests waiting for them: pure logic, no I/O, no clock.

At most ``capacity`` requests hold a slot. The rest wait, ordered by tier first
(``priority``, ``default``, ``flex``: a lower tier gets a slot only while no higher one
waits), then fairly across tenants with virtual token counters (Sheng et al., "Fairness
in Serving Large Language Models", OSDI 2024):

- Each tenant has a counter of the tokens it was served, over its weight: a request adds
  its prompt (up to ``MAX_COST``) when it gets a slot, and ``settle`` adds the rest of
  what it used when it ends. (A guess of the reply counted in advance, and refunded at
  the end, made a newcomer wait behind the refunds of requests already running.)
- When a slot frees, the waiting tenant with the least counter goes next (ties: the one
  holding fewer slots, then the earliest request), its requests in arrival order.
- A tenant that starts waiting is lifted to the least counter of those already waiting
  (or, with none, the counter of the last one served): idleness is not banked as credit.
  And it is never more than ``MAX_LEAD`` tokens behind them either, so what a tenant used
  long ago, while nobody else wanted the server, is not held against it for long.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from app.scheduling.tiers import TIERS

SMOOTHING = 0.2  # how much each release moves the measured time between releases
MAX_GAP = 60.0  # seconds: a longer pause between releases (an idle server) counts as this
# Tokens of a prompt counted when it gets a slot, at most (the rest when it ends): what a
# request's end can give back is bounded, so a prompt padded to look big and refunded
# at the end buys a turn or two, not the server.
MAX_COST = 256.0
MAX_LEAD = 32_768.0  # weighted tokens a returning tenant may be counted ahead of the rest
FORGET_AFTER = 4096  # tenants' counters kept before those of idle tenants are dropped


@dataclass(eq=False)
class Ticket:
    """One request's place: waiting, then holding a slot."""

    tenant: str
    weight: float
    rank: int  # its tier's index in TIERS
    cost: float  # tokens, as estimated when it asked
    size: int = 1  # slots it takes: the generations it runs at once (n), at most capacity
    seq: int = 0
    state: str = "new"  # new, waiting, granted, cancelled, released
    extra: dict[str, object] = field(default_factory=dict)  # the caller's own (its wakeup)

    @property
    def tier(self) -> str:
        return TIERS[self.rank]


class Refused(Exception):
    """The queue is full (for everyone, or for this tenant)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # "queue_full" or "tenant_queue_full"


class ServerQueue:
    def __init__(self, capacity: int, max_waiting: int, max_waiting_per_tenant: int) -> None:
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.max_waiting_per_tenant = max_waiting_per_tenant
        self.in_flight = 0
        self.waiting = 0
        self.waiting_by: dict[tuple[str, int], int] = {}  # (tenant, rank) -> waiting
        self._lines: dict[tuple[str, int], deque[Ticket]] = {}  # each tenant's, FIFO
        self._counters: dict[tuple[str, int], float] = {}
        self._holding: dict[str, int] = {}  # tenant -> slots it holds
        self._last = [0.0] * len(TIERS)  # the counter of the last tenant served, by tier
        self._seq = itertools.count()
        self._released_at: float | None = None
        self._interval = 0.0  # seconds between releases, smoothed (0: not measured yet)

    # ---- asking and giving back ------------------------------------------------------

    def enter(self, ticket: Ticket, retry: bool = False) -> bool:
        """Queues ``ticket``; True when it holds a slot at once. ``retry``: a request that
        failed over from another server goes to the head of its tenant's line. Raises
        Refused past the waiting caps."""
        key = (ticket.tenant, ticket.rank)
        ticket.cost = min(ticket.cost, MAX_COST)
        ticket.seq = next(self._seq)
        if key not in self._lines:  # it starts waiting: lifted to the others
            self._lift(key)
        ticket.size = max(min(ticket.size, self.capacity), 1)
        if self._fits(ticket) and not self._waits_before(ticket):
            self._hold(ticket)
            return True
        if self.waiting >= self.max_waiting:
            ticket.state = "cancelled"
            raise Refused("queue_full")
        if self._tenant_waiting(ticket.tenant) >= self.max_waiting_per_tenant:
            ticket.state = "cancelled"
            raise Refused("tenant_queue_full")
        ticket.state = "waiting"
        self.waiting += 1
        self.waiting_by[key] = self.waiting_by.get(key, 0) + 1
        line = self._lines.setdefault(key, deque())
        if retry:
            line.appendleft(ticket)
        else:
            line.append(ticket)
        return False

    def cancel(self, ticket: Ticket) -> list[Ticket]:
        """A waiting request gave up (its client left, or it waited too long); a granted one
        that will not be used gives its slot back. Returns the tickets granted instead."""
        if ticket.state == "waiting":
            ticket.state = "cancelled"
            key = (ticket.tenant, ticket.rank)
            self._lines[key].remove(ticket)
            if not self._lines[key]:
                del self._lines[key]
            self._unwait(ticket)
            return []
        if ticket.state == "granted":
            return self.release(ticket, None)
        return []

    def release(self, ticket: Ticket, now: float | None) -> list[Ticket]:
        """The request's slot is free; returns the tickets that now hold slots. ``now``
        (seconds, any clock) measures how fast slots free up, for Retry-After."""
        if ticket.state != "granted":
            return []
        ticket.state = "released"
        self.in_flight -= ticket.size
        held = self._holding.get(ticket.tenant, 0) - 1
        if held > 0:
            self._holding[ticket.tenant] = held
        else:
            self._holding.pop(ticket.tenant, None)
        if now is not None:
            if self._released_at is not None:
                gap = min(max(now - self._released_at, 0.0), MAX_GAP)
                self._interval = gap if not self._interval else \
                    self._interval + (gap - self._interval) * SMOOTHING
            self._released_at = now
        return self._grant()

    def settle(self, ticket: Ticket, used: float) -> None:
        """The request used ``used`` tokens where ``ticket.cost`` was counted: its tenant's
        counter moves by the difference."""
        key = (ticket.tenant, ticket.rank)
        if key in self._counters:
            self._counters[key] = max(
                self._counters[key] + (used - ticket.cost) / ticket.weight, 0.0)

    def resize(self, capacity: int) -> list[Ticket]:
        """The server's capacity changed; returns the tickets that now hold slots."""
        self.capacity = capacity
        return self._grant()

    def evict(self) -> list[Ticket]:
        """The server failed: every waiting ticket leaves (to go elsewhere), returned."""
        gone = [ticket for line in self._lines.values() for ticket in line]
        for ticket in gone:
            ticket.state = "cancelled"
            self._unwait(ticket)
        self._lines.clear()
        return gone

    # ---- what a waiting client is told -----------------------------------------------

    def position(self, ticket: Ticket) -> int:
        """About how many waiting requests go before this one: all of higher tiers, and of
        its own, a turn of each other tenant for each of its own ahead of it."""
        key = (ticket.tenant, ticket.rank)
        line = self._lines.get(key)
        own = line.index(ticket) if line is not None and ticket in line else 0
        ahead = own
        for (tenant, rank), others in self._lines.items():
            if rank < ticket.rank:
                ahead += len(others)
            elif rank == ticket.rank and tenant != ticket.tenant:
                ahead += min(len(others), own + 1)
        return ahead

    def drain_seconds(self, ahead: int) -> float:
        """A guess of how long ``ahead`` requests take to be served, from how fast slots
        have been freeing up (a second each while nothing has been measured)."""
        interval = self._interval or 1.0
        return (ahead + 1) * interval

    # ---- inside ----------------------------------------------------------------------

    def _grant(self) -> list[Ticket]:
        granted = []
        while self.in_flight < self.capacity and self._lines:
            key = self._next()
            line = self._lines[key]
            if not self._fits(line[0]):
                break  # the next one needs more slots than are free: it waits for them
            ticket = line.popleft()
            if not line:
                del self._lines[key]
            self._unwait(ticket)
            self._hold(ticket)
            granted.append(ticket)
        if len(self._counters) > FORGET_AFTER:
            self._forget()
        return granted

    def _next(self) -> tuple[str, int]:
        """The line whose head goes next: the highest tier, the least counter, the fewest
        slots held, the earliest request."""
        return min(self._lines, key=lambda key: (
            key[1], self._counters.get(key, 0.0), self._holding.get(key[0], 0),
            self._lines[key][0].seq))

    def _fits(self, ticket: Ticket) -> bool:
        return self.in_flight + min(ticket.size, self.capacity) <= self.capacity

    def _hold(self, ticket: Ticket) -> None:
        ticket.state = "granted"
        self.in_flight += ticket.size
        self._holding[ticket.tenant] = self._holding.get(ticket.tenant, 0) + 1
        key = (ticket.tenant, ticket.rank)
        counter = self._counters.get(key, 0.0)
        self._last[ticket.rank] = counter
        self._counters[key] = counter + ticket.cost / ticket.weight

    def _floor(self, rank: int, key: tuple[str, int]) -> float:
        """The least counter of the others waiting at ``rank``, else the last served's."""
        waiting = [self._counters.get(other, 0.0) for other in self._lines
                   if other[1] == rank and other != key]
        return min(waiting) if waiting else self._last[rank]

    def _lift(self, key: tuple[str, int]) -> None:
        floor = self._floor(key[1], key)
        counter = self._counters.get(key, 0.0)
        self._counters[key] = min(max(counter, floor), floor + MAX_LEAD)

    def _waits_before(self, ticket: Ticket) -> bool:
        """Whether a waiting request goes before ``ticket``."""
        if not self._lines:
            return False
        key = (ticket.tenant, ticket.rank)
        if key in self._lines:
            return True  # its own tenant's, earlier
        best = self._next()
        mine = (ticket.rank, self._counters.get(key, 0.0), self._holding.get(ticket.tenant, 0))
        theirs = (best[1], self._counters.get(best, 0.0), self._holding.get(best[0], 0))
        return theirs <= mine

    def _unwait(self, ticket: Ticket) -> None:
        self.waiting -= 1
        key = (ticket.tenant, ticket.rank)
        left = self.waiting_by.get(key, 0) - 1
        if left > 0:
            self.waiting_by[key] = left
        else:
            self.waiting_by.pop(key, None)

    def _tenant_waiting(self, tenant: str) -> int:
        return sum(self.waiting_by.get((tenant, rank), 0) for rank in range(len(TIERS)))

    def _forget(self) -> None:
        """Drops the counters of tenants that neither wait nor hold a slot: when one comes
        back it is lifted to the others anyway."""
        self._counters = {key: value for key, value in self._counters.items()
                          if key in self._lines or key[0] in self._holding}

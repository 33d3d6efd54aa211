"""This process's slots on each model server, and its requests waiting for them.

``take`` returns at once while the server has a free slot and nobody waits before the
request; else the request waits in the gateway (holding no worker connection) until
``ServerQueue`` grants it a slot, its client leaves (dropped at once), it waits too long
(a 429), or the server fails (it goes to another one). ``Held.release`` gives the slot
back when the request is done with the server.

Without a common store, each of ``processes`` gateway processes uses its share of every
server's capacity (at least one slot); ``app.scheduling.redis_slots`` shares them.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from app.errors import ClientClosedRequest, RateLimitExceeded, UpstreamUnavailable
from app.scheduling.fair_queue import Refused, ServerQueue, Ticket
from app.scheduling.tiers import RANK, TIERS

TICK = 0.25  # how often a waiting request looks at its client
MAX_RETRY_AFTER = 600


@dataclass(frozen=True)
class Place:
    """Who a request waits as: its tenant (team, else key), the tenant's weight, the tier
    it is served at, and its prompt in tokens (the rest is counted when it ends)."""

    tenant: str
    weight: float
    tier: str
    cost: float  # tokens counted when it gets a slot (its prompt)
    size: int = 1  # the generations it runs at once on the server (n)


class QueueObserver(Protocol):
    """The gateway's metrics for the queues."""

    def waiting(self, model: str, tier: str, change: int) -> None: ...
    def waited(self, model: str, tier: str, tenant: str, seconds: float) -> None: ...
    def refused(self, model: str, tier: str, reason: str) -> None: ...
    def slots(self, server: str, in_use: int, change: int) -> None: ...


class ServerLeft(UpstreamUnavailable):
    """The server a request waited for failed: it goes to another one (failover)."""

    failover = True
    code = "server_failed"


@dataclass
class Waits:
    """The caps on waiting, per server: in all, and per tenant; how long each tier may
    wait (seconds)."""

    max_waiting: int = 1000
    max_waiting_per_tenant: int = 100
    timeouts: tuple[float, ...] = (10.0, 10.0, 600.0)  # by tier rank


class SlotStore(Protocol):
    """Where a Held slot goes back to: this process's Slots, or RedisSlots."""

    def release(self, held: "Held", used: float | None) -> None: ...


class Lines(Protocol):
    """What serving asks of the servers' lines: this process's Slots, or RedisSlots."""

    def take(self, server: str, model: str, capacity: int, place: Place,
             client_gone: Callable[[], bool], retry: bool = False) -> "Held": ...

    def server_failed(self, server: str) -> None: ...
    def snapshot(self) -> list[dict[str, Any]]: ...
    def drain(self) -> None: ...


class Held:
    """A request's slot on a server; ``release`` it (once is enough; more are harmless)
    with what the request used, in tokens, where known. ``ticket``: its Ticket here, or
    what RedisSlots knows it by."""

    __slots__ = ("_slots", "server", "ticket", "waited")

    def __init__(self, slots: SlotStore, server: str, ticket: Any, waited: float) -> None:
        self._slots = slots
        self.server = server
        self.ticket = ticket
        self.waited = waited

    def release(self, used: float | None = None) -> None:
        self._slots.release(self, used)


class Slots:
    def __init__(self, waits: Waits, processes: int = 1,
                 clock: Callable[[], float] = time.monotonic,
                 observer: QueueObserver | None = None) -> None:
        self.waits = waits
        self.processes = max(processes, 1)
        self._clock = clock
        self._observer = observer
        self._queues: dict[str, ServerQueue] = {}
        self._models: dict[str, str] = {}  # server -> a model it serves (for metrics)
        self._lock = threading.Lock()

    def share(self, capacity: int) -> int:
        """This process's part of a server's capacity."""
        return max(capacity // self.processes, 1)

    def take(self, server: str, model: str, capacity: int, place: Place,
             client_gone: Callable[[], bool], retry: bool = False) -> Held:
        began = self._clock()
        rank = RANK.get(place.tier, RANK["default"])
        ticket = Ticket(place.tenant, place.weight, rank, place.cost, place.size)
        with self._lock:
            queue = self._queue(server, model, capacity)
            try:
                granted = queue.enter(ticket, retry)
            except Refused as refused:
                self._refused(model, place.tier, refused.reason)
                raise self.full_error(refused.reason, retry_after(
                    queue.drain_seconds(queue.waiting))) from None
            if not granted:  # made under the lock: a release may set it at once
                event = ticket.extra["event"] = threading.Event()
        observer = self._observer
        if not granted:
            if observer is not None:
                observer.waiting(model, place.tier, 1)
            try:
                self._wait(queue, ticket, event, began + self.waits.timeouts[rank],
                           client_gone, model)
            finally:
                if observer is not None:
                    observer.waiting(model, place.tier, -1)
        held = Held(self, server, ticket, self._clock() - began if not granted else 0.0)
        if observer is not None:
            if not granted:
                observer.waited(model, place.tier, place.tenant, held.waited)
            observer.slots(server, queue.in_flight, ticket.size)
        return held

    def release(self, held: Held, used: float | None) -> None:
        with self._lock:
            queue = self._queues.get(held.server)
            if queue is None or not isinstance(held.ticket, Ticket) \
                    or held.ticket.state != "granted":
                return
            if used is not None:
                queue.settle(held.ticket, used)
            self._wake(queue.release(held.ticket, self._clock()))
            if self._observer is not None:
                self._observer.slots(held.server, queue.in_flight, -held.ticket.size)

    def drain(self) -> None:
        """Nothing to send anywhere on a stop (RedisSlots sends its releases)."""

    def server_failed(self, server: str) -> None:
        """Whoever waits for ``server`` goes elsewhere."""
        with self._lock:
            queue = self._queues.get(server)
            if queue is not None:
                for ticket in queue.evict():
                    ticket.extra["left"] = True
                    self._set(ticket)

    def snapshot(self) -> list[dict[str, Any]]:
        """Each server's capacity (this process's share), slots in use and waiting
        requests by tenant and tier: for /admin and the metrics."""
        with self._lock:
            return [{"server": server, "model": self._models.get(server, ""),
                     "capacity": queue.capacity, "in_flight": queue.in_flight,
                     "waiting": [{"tenant": tenant, "tier": TIERS[rank], "requests": count}
                                 for (tenant, rank), count in sorted(queue.waiting_by.items())]}
                    for server, queue in sorted(self._queues.items())]

    # ---- inside ----------------------------------------------------------------------

    def _queue(self, server: str, model: str, capacity: int) -> ServerQueue:
        share = self.share(capacity)
        queue = self._queues.get(server)
        if queue is None:
            queue = self._queues[server] = ServerQueue(share, self.waits.max_waiting,
                                                       self.waits.max_waiting_per_tenant)
            self._models[server] = model
        elif queue.capacity != share:  # the server said it changed
            self._wake(queue.resize(share))
        return queue

    def _wait(self, queue: ServerQueue, ticket: Ticket, event: threading.Event,
              deadline: float, client_gone: Callable[[], bool], model: str) -> None:
        while True:
            remaining = deadline - self._clock()
            if event.wait(min(TICK, max(remaining, 0.0))) or ticket.state == "granted":
                if ticket.extra.get("left"):
                    raise ServerLeft("The model server this request waited for failed.")
                return
            gone = client_gone()
            if gone or remaining <= 0:
                with self._lock:
                    if ticket.state == "granted":  # granted meanwhile: use it, unless gone
                        if not gone:
                            return
                        self._wake(queue.cancel(ticket))
                    else:
                        ahead = queue.position(ticket)
                        queue.cancel(ticket)
                if gone:
                    raise ClientClosedRequest("The client closed the connection while "
                                              "the request waited for the model.")
                self._refused(model, TIERS[ticket.rank], "timeout")
                raise self.timeout_error(ticket.rank, retry_after(queue.drain_seconds(ahead)))

    def timeout_error(self, rank: int, retry: str) -> RateLimitExceeded:
        """The 429 for a request that waited its tier's whole timeout."""
        return RateLimitExceeded(
            f"The model is busy: this request waited {self.waits.timeouts[rank]:g} s at the "
            f"{TIERS[rank]} tier without getting a turn; retry later.", "requests",
            headers={"Retry-After": retry})

    def full_error(self, reason: str, retry: str) -> RateLimitExceeded:
        """The 429 for a full line (``reason``: queue_full, tenant_queue_full)."""
        headers = {"Retry-After": retry}
        if reason == "tenant_queue_full":
            return RateLimitExceeded(
                f"The model is busy and your team already has "
                f"{self.waits.max_waiting_per_tenant} requests waiting for it; retry once "
                "some have been served.", "requests", headers=headers)
        return RateLimitExceeded(f"The model is busy: {self.waits.max_waiting} requests "
                                 "already wait for it; retry later.", "requests",
                                 headers=headers)

    def _refused(self, model: str, tier: str, reason: str) -> None:
        if self._observer is not None:
            self._observer.refused(model, tier, reason)

    def _wake(self, tickets: list[Ticket]) -> None:
        for ticket in tickets:
            self._set(ticket)

    @staticmethod
    def _set(ticket: Ticket) -> None:
        event = ticket.extra.get("event")
        if isinstance(event, threading.Event):
            event.set()


def retry_after(estimate: float) -> str:
    """A Retry-After value from an estimate in seconds."""
    return str(min(max(math.ceil(estimate), 1), MAX_RETRY_AFTER))

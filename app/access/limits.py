"""Per-key limits: requests and tokens per minute, generations in parallel, and a token
budget per day or month; what an admitted request holds of them until it ends.

A request reserves its worst case at admission (``app.access.reservations``) and is
settled to what it used when it ends. The counters live in this process's memory (one
process, exact; several without a common store: each enforces its share), or in Redis
(``app.access.redis_limits``), where one script checks and reserves every limit of a
request in one round trip.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from app.access.reservations import Ask, Plan, budget_need, plan
from app.access.windows import Window, count, position, wait, window

TPM_ESTIMATE = 256  # completion tokens per choice a request without max_tokens reserves


@dataclass(frozen=True)
class KeyLimits:
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budget: int | None = None  # tokens per budget period
    period: str | None = None  # the budget's: "day" or "month" (UTC)

    def __bool__(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_parallel or self.budget)

    def share(self, processes: int) -> "KeyLimits":
        """Each process's part of the rates when the processes cannot count together (a
        budget's share is taken of what is left of it: see MemoryLimiter)."""
        def part(limit: int | None) -> int | None:
            return max(limit // processes, 1) if limit else limit
        return KeyLimits(part(self.rpm), part(self.tpm), part(self.max_parallel),
                         self.budget, self.period)


@dataclass(slots=True)
class Reservation:
    """What an admitted request holds until it is settled."""

    tokens: int = 0  # counted toward tpm (settled to what was used)
    counted: bool = False  # tokens went into the tpm window
    budget: int = 0  # held of the budget
    slots: int = 0  # parallel slots taken
    lease: str = ""  # names this request's slots and budget hold in Redis
    period: str = ""  # the budget period it was admitted in (Redis)
    minute: int = 0  # the minute it was admitted in: tpm is settled there
    local: bool = False  # admitted by this process alone (Redis was unreachable)


@dataclass(slots=True)
class Verdict:
    allowed: bool
    reason: str | None = None  # "budget", "requests", "tokens" or "parallel" when refused
    retry_after: float = 0.0  # seconds, when waiting helps
    never: bool = False  # refused however long it waits (it asks for more than the limit)
    requests: Window | None = None
    tokens: Window | None = None
    cap: int | None = None  # max tokens per choice the budget allows (sent to the model)
    asked: int = 0  # what it asked of the limit that refused it
    limit: int = 0  # that limit (this process's share of it, without Redis)
    left: int = 0  # what was left of the budget (refusals)
    processes: int = 1  # how many processes share the limits without Redis
    spent_out: bool = False  # the budget is spent, not only held by requests in flight
    reservation: Reservation = field(default_factory=Reservation)


ALLOWED = Verdict(True)


class Limiter(Protocol):
    def admit(self, key: str, limits: KeyLimits, ask: Ask, spent: int) -> Verdict: ...
    def settle(self, key: str, reservation: Reservation, used: int) -> None: ...
    def drain(self) -> None: ...


def decide(limits: KeyLimits, fraction: float, requests: tuple[float, float],
           tokens: tuple[float, float], in_flight: int, ask: Ask, planned: Plan) -> Verdict:
    """The decision from the counts before this request: (previous, current) minute per
    kind, and the parallel slots taken. The budget was planned already."""
    reason, retry, never, asked, limit = None, 0.0, False, 0, 0
    if planned.short:
        reason, limit = "budget", limits.budget or 0
    elif limits.rpm and ask.counts_request and count(*requests, fraction) + 1 > limits.rpm:
        reason, retry, limit = "requests", wait(*requests, fraction, limits.rpm, 1), limits.rpm
    elif limits.tpm and count(*tokens, fraction) + planned.tokens > limits.tpm:
        reason, asked, limit = "tokens", planned.tokens, limits.tpm
        retry = wait(*tokens, fraction, limits.tpm, planned.tokens)
        never = planned.tokens > limits.tpm
    elif limits.max_parallel and in_flight + ask.choices > limits.max_parallel:
        reason, retry, asked, limit = "parallel", 1.0, ask.choices, limits.max_parallel
        never = ask.choices > limits.max_parallel
    taken_r = 1 if reason is None and ask.counts_request else 0
    taken_t = planned.tokens if reason is None and ask.reserves else 0
    return Verdict(
        reason is None, reason, retry, never,
        window(limits.rpm, requests[0], requests[1] + taken_r, fraction) if limits.rpm
        else None,
        window(limits.tpm, tokens[0], tokens[1] + taken_t, fraction) if limits.tpm else None,
        planned.cap, asked, limit)


def budget_refusal(verdict: Verdict, ask: Ask, room: int, unheld_room: int) -> Verdict:
    """Fills in why a budget refused: what it needed, what was left, and whether the
    budget is spent (waiting will not help) or held by requests in flight."""
    verdict.asked = budget_need(ask)
    verdict.left = max(room, 0)
    verdict.spent_out = unheld_room < verdict.asked
    if not verdict.spent_out:
        verdict.retry_after = 1.0
    return verdict


# ---- one process ------------------------------------------------------------------------

class MemoryLimiter:
    """Counters in this process. ``processes``: how many share the limits without a common
    store; each enforces its share of the rates, and holds at most its share of what is
    left of a budget."""

    def __init__(self, processes: int = 1, tpm_estimate: int = TPM_ESTIMATE,
                 clock: Callable[[], float] = time.time) -> None:
        self.processes = max(processes, 1)
        self._estimate = tpm_estimate
        self._clock = clock
        self._minutes: dict[tuple[str, str], list[float]] = {}  # -> [minute, prev, cur]
        self._slots: dict[str, int] = {}  # parallel slots taken, per key
        self._held: dict[str, int] = {}  # budget held by requests in flight, per key
        self._lock = threading.Lock()

    def admit(self, key: str, limits: KeyLimits, ask: Ask, spent: int) -> Verdict:
        shared = limits.share(self.processes) if self.processes > 1 else limits
        minute, fraction = position(self._clock())
        with self._lock:
            requests, tokens = self._slot(key, "r", minute), self._slot(key, "t", minute)
            in_flight = self._slots.get(key, 0)
            room = unheld = None
            if limits.budget:
                unheld = (limits.budget - spent) // self.processes
                room = unheld - self._held.get(key, 0)
            planned = plan(ask, room, self._estimate, shared.tpm)
            decided = decide(shared, fraction, (requests[1], requests[2]),
                             (tokens[1], tokens[2]), in_flight, ask, planned)
            decided.processes = self.processes
            if not decided.allowed:
                if decided.reason == "budget":
                    assert room is not None and unheld is not None
                    budget_refusal(decided, ask, room, unheld)
                return decided
            if ask.counts_request:
                requests[2] += 1
            if ask.reserves:
                held = decided.reservation
                held.minute = minute
                if shared.tpm:
                    tokens[2] += planned.tokens
                    held.tokens, held.counted = planned.tokens, True
                if shared.max_parallel:
                    self._slots[key] = in_flight + ask.choices
                    held.slots = ask.choices
                if limits.budget:
                    self._held[key] = self._held.get(key, 0) + planned.budget
                    held.budget = planned.budget
        return decided

    def settle(self, key: str, reservation: Reservation, used: int) -> None:
        """What it used past its tpm reservation counts now; what it gives back is given
        back in the minute it was reserved in (a refund must not erase another request's
        tokens of a later minute), if that minute still counts."""
        minute, _ = position(self._clock())
        with self._lock:
            if reservation.counted and used != reservation.tokens:
                slot = self._slot(key, "t", minute)
                delta = used - reservation.tokens
                which = 2 if delta > 0 or reservation.minute == minute else \
                    1 if reservation.minute == minute - 1 else 0
                if which:
                    slot[which] = max(slot[which] + delta, 0.0)
            if reservation.slots:
                self._slots[key] = max(self._slots.get(key, 0) - reservation.slots, 0)
            if reservation.budget:
                self._held[key] = max(self._held.get(key, 0) - reservation.budget, 0)

    def drain(self) -> None:
        pass  # nothing waits to be sent anywhere

    def _slot(self, key: str, kind: str, minute: int) -> list[float]:
        slot = self._minutes.get((key, kind))
        if slot is None:
            slot = self._minutes[(key, kind)] = [minute, 0.0, 0.0]
        elif slot[0] != minute:  # roll: the current minute becomes the previous one
            slot[1] = slot[2] if slot[0] == minute - 1 else 0.0
            slot[2] = 0.0
            slot[0] = minute
        return slot

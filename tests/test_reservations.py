"""Reservation and settlement, in process with an injected clock (no sockets, no sleeps):
what a request reserves of its key's rpm, tpm, parallel slots and budget, what its budget
caps, what is refused and how (retry or not), and what is given back when it ends. The
real-process tests (tests/test_tenant_safety.py) prove the wiring."""
from __future__ import annotations

from datetime import datetime

import pytest

from app.access.budgets import Budgets
from app.access.directory import KeyDirectory, Principal
from app.access.gate import Gate
from app.access.limits import KeyLimits, MemoryLimiter
from app.access.reservations import UNKNOWN_CONTEXT, Ask, estimate_tokens, plan
from app.access.retention import cutoff
from app.errors import QuotaExceeded, RateLimitExceeded


class Clock:
    def __init__(self, now: float = 1_000_020.0) -> None:  # 20 s into a minute
        self.now = now

    def __call__(self) -> float:
        return self.now


def gate_for(limits: KeyLimits, processes: int = 1, estimate: int = 256,
             clock: Clock | None = None) -> tuple[Gate, Principal, Budgets]:
    budgets = Budgets()
    limiter = MemoryLimiter(processes, estimate, clock or Clock())
    gate = Gate(KeyDirectory(None, (), 1.0, budgets), limiter, budgets, None, None)
    return gate, Principal("key_1", "tenant", None, None, limits, "key_1", "key_1", 1.0,
                           "default", "default"), budgets


# ---- the plan ------------------------------------------------------------------------

def test_a_prompt_is_estimated_from_its_bytes_rounded_up() -> None:
    assert [estimate_tokens(n) for n in (0, 1, 4, 5, 4000)] == [0, 1, 1, 2, 1000]


def test_with_max_tokens_the_budget_reserves_all_of_it_or_refuses() -> None:
    ask = Ask(prompt=10, completion=5, choices=4)
    assert plan(ask, budget_room=29, tpm_estimate=256).short
    fits = plan(ask, budget_room=30, tpm_estimate=256)
    assert (fits.short, fits.budget, fits.cap, fits.tokens) == (False, 30, None, 30)


def test_without_max_tokens_the_budget_caps_the_reply_and_the_context_bounds_it() -> None:
    near_the_end = plan(Ask(prompt=10, completion=None, choices=4, context=2048), 30, 256)
    assert (near_the_end.cap, near_the_end.budget, near_the_end.short) == (5, 30, False)
    ample = plan(Ask(prompt=10, completion=None, choices=1, context=2048), 1_000_000, 256)
    # The context binds: nothing to send, and the reservation is what the context allows.
    assert ample.cap is None and ample.budget == 10 + 2038
    # A context not known yet (an upstream without context_length): capped all the same.
    unknown = plan(Ask(prompt=10, completion=None), 1_000_000, 256)
    assert unknown.cap == UNKNOWN_CONTEXT and unknown.budget == 10 + UNKNOWN_CONTEXT
    spent = plan(Ask(prompt=10, completion=None, choices=4), 13, 256)
    assert spent.short


def test_tpm_reserves_max_tokens_or_an_estimate_a_small_limit_still_admits() -> None:
    assert plan(Ask(prompt=20, completion=100, choices=4), None, 256).tokens == 420
    assert plan(Ask(prompt=20, completion=None, choices=2), None, 256).tokens == 20 + 512
    # The estimate never asks more than the limit leaves after the prompt...
    assert plan(Ask(prompt=20, completion=None, choices=2), None, 256, 60).tokens == 60
    # ...but an explicit max_tokens is the client's word.
    assert plan(Ask(prompt=20, completion=100), None, 256, 60).tokens == 120
    # Embeddings and token checks generate nothing.
    assert plan(Ask(prompt=20, completion=0), None, 256).tokens == 20


# ---- the limiter and the gate ----------------------------------------------------------

def test_budget_overrun_is_at_most_one_reservation_however_many_ask_at_once() -> None:
    """16 concurrent n=4 requests against a 30-token budget: only what fits is admitted,
    and the reply is capped so that the reservation holds."""
    gate, principal, budgets = gate_for(KeyLimits(tpm=2000, budget=30, period="day"))
    admitted, refused = [], []
    for _ in range(16):
        try:
            admitted.append(gate.admit(principal, Ask(prompt=18, completion=None, choices=4,
                                                      context=2048)))
        except QuotaExceeded as exc:
            refused.append(exc)
    assert len(admitted) == 1 and admitted[0].cap == 3  # (30 - 18) // 4
    assert len(refused) == 15
    # Held by a request in flight, not spent: the official client may retry.
    assert refused[0].headers.get("Retry-After") == "1"
    assert "x-should-retry" not in refused[0].headers
    gate.finish(admitted[0], 1, 12)  # as the worker counted
    assert budgets.spent("key_1") == 13
    again = gate.admit(principal, Ask(prompt=5, completion=None, choices=1, context=2048))
    assert again.cap == 30 - 13 - 5
    gate.finish(again, 5, 12)
    with pytest.raises(QuotaExceeded) as spent:
        gate.admit(principal, Ask(prompt=5, completion=None))
    assert spent.value.headers == {"x-should-retry": "false"}  # spent: waiting won't help
    assert "budget of 30" in spent.value.message


def test_tpm_reservation_is_settled_to_what_was_used() -> None:
    clock = Clock()
    gate, principal, _ = gate_for(KeyLimits(tpm=900), clock=clock)
    first = gate.admit(principal, Ask(prompt=100, completion=200, choices=2))
    assert first.verdict.tokens is not None and first.verdict.tokens.remaining == 400
    with pytest.raises(RateLimitExceeded) as refused:
        gate.admit(principal, Ask(prompt=100, completion=200, choices=2))
    assert refused.value.type == "tokens" and "Requested 500" in refused.value.message
    assert int(refused.value.headers["Retry-After"]) >= 1
    gate.finish(first, 100, 50)  # it used 150 of its 500
    second = gate.admit(principal, Ask(prompt=100, completion=200, choices=2))
    assert second.verdict.tokens is not None and second.verdict.tokens.remaining == 250
    with pytest.raises(RateLimitExceeded) as never:
        gate.admit(principal, Ask(prompt=100, completion=2000))
    assert never.value.headers["x-should-retry"] == "false"  # more than the whole limit
    assert "Retry-After" not in never.value.headers


def test_max_parallel_counts_each_choice() -> None:
    gate, principal, _ = gate_for(KeyLimits(max_parallel=4))
    three = gate.admit(principal, Ask(prompt=1, completion=None, choices=3))
    with pytest.raises(RateLimitExceeded) as busy:
        gate.admit(principal, Ask(prompt=1, completion=None, choices=2))
    assert "Requested 2" in busy.value.message and busy.value.headers["Retry-After"]
    gate.admit(principal, Ask(prompt=1, completion=None, choices=1))
    gate.finish(three, 1, 3)
    gate.admit(principal, Ask(prompt=1, completion=None, choices=3))
    with pytest.raises(RateLimitExceeded) as never:
        gate.admit(principal, Ask(prompt=1, completion=None, choices=128))
    assert never.value.headers["x-should-retry"] == "false" and "128" in never.value.message


def test_rpm_slides_over_the_minute() -> None:
    clock = Clock()
    gate, principal, _ = gate_for(KeyLimits(rpm=2), clock=clock)
    for _ in range(2):
        gate.admit(principal, Ask(prompt=1, completion=1))
    with pytest.raises(RateLimitExceeded) as refused:
        gate.admit(principal, Ask(prompt=1, completion=1))
    wait = int(refused.value.headers["Retry-After"])
    assert 40 <= wait <= 120  # the minute must slide past the two
    clock.now += 120
    gate.admit(principal, Ask(prompt=1, completion=1))


def test_a_demo_ticket_counts_the_request_and_holds_nothing() -> None:
    gate, principal, _ = gate_for(KeyLimits(rpm=1, max_parallel=1, budget=100,
                                            period="day"))
    ticket = gate.admit(principal, Ask(prompt=10, completion=None, reserves=False))
    assert ticket.verdict.reservation.slots == 0 and ticket.verdict.reservation.budget == 0
    with pytest.raises(RateLimitExceeded):  # the ticket was the minute's one request
        gate.admit(principal, Ask(prompt=10, completion=None, reserves=False))
    stream = gate.admit(principal, Ask(prompt=10, completion=None, counts_request=False,
                                       context=50))
    assert stream.verdict.reservation.slots == 1 and stream.verdict.reservation.budget == 50


def test_several_processes_without_redis_each_hold_their_share() -> None:
    gate, principal, _ = gate_for(KeyLimits(budget=100, period="day", tpm=1000),
                                  processes=2)
    admitted = gate.admit(principal, Ask(prompt=10, completion=None, context=4096))
    assert admitted.cap == 40  # half of what is left, after the prompt
    with pytest.raises(QuotaExceeded) as refused:
        gate.admit(principal, Ask(prompt=10, completion=None))
    assert "share" in refused.value.message  # it says why it is less than the key's budget
    assert admitted.verdict.tokens is not None and admitted.verdict.tokens.limit == 500
    rates, principal, _ = gate_for(KeyLimits(tpm=1000), processes=2)
    with pytest.raises(RateLimitExceeded) as too_big:
        rates.admit(principal, Ask(prompt=10, completion=600))
    assert "Limit 500 (this process's share" in too_big.value.message


def test_keys_without_limits_pass_untouched() -> None:
    gate, principal, _ = gate_for(KeyLimits())
    admitted = gate.admit(principal, Ask(prompt=10, completion=None, choices=128))
    assert admitted.cap is None and admitted.headers() == []
    assert admitted.completion_ceiling() == UNKNOWN_CONTEXT * 128


# ---- retention -------------------------------------------------------------------------

def test_retention_cuts_whole_days() -> None:
    at = datetime(2026, 12, 6, 15, 30)
    assert cutoff(at, 30 * 86400) == datetime(2026, 11, 6)
    assert cutoff(at, 3600) == datetime(2026, 12, 6)
    assert cutoff(datetime(2026, 12, 6, 0, 30), 3600) == datetime(2026, 12, 5)


def test_a_refund_lands_in_the_minute_it_was_reserved_in() -> None:
    """A request admitted last minute that used less than it reserved gives the rest back
    to that minute, not by erasing what this minute's requests hold."""
    clock = Clock(1_000_070.0)  # 50 s into a minute
    gate, principal, _ = gate_for(KeyLimits(tpm=1000), clock=clock)
    long_one = gate.admit(principal, Ask(prompt=0, completion=900))
    clock.now += 20  # the next minute, 10 s in
    with pytest.raises(RateLimitExceeded):  # the long one still weighs 5/6 of its 900
        gate.admit(principal, Ask(prompt=0, completion=400))
    now_one = gate.admit(principal, Ask(prompt=0, completion=200))
    gate.finish(long_one, 0, 10)  # it used 10 of its 900
    assert now_one.verdict.tokens is not None
    fits = gate.admit(principal, Ask(prompt=0, completion=700))  # 200 + 700 + 10 * 5/6
    assert fits.verdict.tokens is not None and fits.verdict.tokens.remaining == 91
    with pytest.raises(RateLimitExceeded):
        gate.admit(principal, Ask(prompt=0, completion=100))


def test_what_a_request_made_past_its_reservation_counts_now() -> None:
    clock = Clock()
    gate, principal, _ = gate_for(KeyLimits(tpm=1000), clock=clock)
    small = gate.admit(principal, Ask(prompt=0, completion=10))
    clock.now += 180  # long past the minute it was reserved in
    gate.finish(small, 0, 900)  # it made far more than it reserved (an upstream's say)
    with pytest.raises(RateLimitExceeded):
        gate.admit(principal, Ask(prompt=0, completion=200))

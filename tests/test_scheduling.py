"""The fair queue itself, in process: capacity, tiers, shares by weight, what a newcomer
starts at, caps, the drain rate. No sockets, no sleeps: time is passed in."""
from __future__ import annotations

import collections

import pytest

from app.errors import RateLimitExceeded
from app.scheduling.fair_queue import Refused, ServerQueue, Ticket
from app.scheduling.slots import Place, Slots, Waits
from app.scheduling.tiers import RANK, granted_tier


def ticket(tenant: str, weight: float = 1.0, tier: str = "default",
           cost: float = 100.0) -> Ticket:
    return Ticket(tenant, weight, RANK[tier], cost)


def serve(queue: ServerQueue, held: list[Ticket], count: int) -> list[str]:
    """Releases the oldest held slot ``count`` times; the tenants granted, in order."""
    order: list[str] = []
    for step in range(count):
        granted = queue.release(held.pop(0), float(step))
        held.extend(granted)
        order.extend(t.tenant for t in granted)
    return order


def backlog(queue: ServerQueue, tenants: dict[str, float], each: int) -> list[Ticket]:
    held = []
    for _ in range(each):
        for tenant, weight in tenants.items():
            one = ticket(tenant, weight)
            if queue.enter(one):
                held.append(one)
    return held


def test_capacity_is_never_exceeded_and_a_tenant_goes_in_arrival_order() -> None:
    queue = ServerQueue(2, 100, 100)
    tickets = [ticket("a") for _ in range(5)]
    assert [queue.enter(t) for t in tickets] == [True, True, False, False, False]
    assert queue.in_flight == 2 and queue.waiting == 3
    assert queue.release(tickets[0], 0.0) == [tickets[2]]
    assert queue.release(tickets[1], 1.0) == [tickets[3]]
    assert queue.in_flight == 2 and queue.waiting == 1
    assert queue.release(tickets[0], 2.0) == []  # released twice: nothing more is freed
    assert queue.in_flight == 2


def test_two_backlogged_tenants_share_equally() -> None:
    queue = ServerQueue(2, 1000, 1000)
    held = backlog(queue, {"heavy": 1.0, "other": 1.0}, 100)
    counts = collections.Counter(serve(queue, held, 100))
    assert counts["heavy"] == counts["other"] == 50


def test_weights_two_to_one_give_two_to_one() -> None:
    queue = ServerQueue(3, 1000, 1000)
    held = backlog(queue, {"big": 2.0, "small": 1.0}, 100)
    counts = collections.Counter(serve(queue, held, 90))
    assert counts["big"] == 60 and counts["small"] == 30


def test_a_light_tenant_goes_next_however_long_the_heavy_backlog() -> None:
    queue = ServerQueue(2, 1000, 1000)
    held = backlog(queue, {"heavy": 1.0}, 16)
    serve(queue, held, 5)
    light = ticket("light")
    assert not queue.enter(light)
    assert serve(queue, held, 1) == ["light"]


def test_a_newcomer_starts_at_the_current_minimum_not_with_banked_credit() -> None:
    queue = ServerQueue(1, 1000, 1000)
    held = backlog(queue, {"early": 1.0}, 60)
    serve(queue, held, 40)  # "early" alone for a while
    for _ in range(20):
        queue.enter(ticket("late"))
    order = serve(queue, held, 20)
    # Alternating from now on: "late" did not get the 40 turns "early" had alone.
    assert collections.Counter(order) == {"early": 10, "late": 10}


def test_flex_waits_while_default_waits_and_gets_everything_alone() -> None:
    queue = ServerQueue(1, 100, 100)
    first = ticket("a", tier="flex")
    assert queue.enter(first)  # nothing else waits: flex gets the idle server
    flex, default = ticket("b", tier="flex"), ticket("c")
    priority = ticket("d", tier="priority")
    for one in (flex, default, priority):
        assert not queue.enter(one)
    assert queue.release(first, 0.0) == [priority]
    assert queue.release(priority, 1.0) == [default]
    assert queue.release(default, 2.0) == [flex]


def test_the_waiting_caps_refuse_past_them() -> None:
    queue = ServerQueue(1, 3, 2)
    assert queue.enter(ticket("a"))
    queue.enter(ticket("a"))
    queue.enter(ticket("a"))
    with pytest.raises(Refused) as per_tenant:
        queue.enter(ticket("a"))
    assert per_tenant.value.reason == "tenant_queue_full"
    queue.enter(ticket("b"))
    with pytest.raises(Refused) as full:
        queue.enter(ticket("c"))
    assert full.value.reason == "queue_full"


def test_a_cancelled_wait_frees_its_place() -> None:
    queue = ServerQueue(1, 100, 100)
    holder, leaver, next_one = ticket("a"), ticket("b"), ticket("c")
    queue.enter(holder)
    queue.enter(leaver)
    queue.enter(next_one)
    queue.cancel(leaver)
    assert queue.waiting == 1 and queue.position(next_one) == 0
    assert queue.release(holder, 0.0) == [next_one]


def test_settling_moves_the_tenant_by_what_it_really_used() -> None:
    queue = ServerQueue(1, 1000, 1000)
    cheap = ticket("cheap", cost=100.0)
    queue.enter(cheap)
    waiting = [ticket("cheap"), ticket("other"), ticket("other")]
    for one in waiting:
        queue.enter(one)
    queue.settle(cheap, 10_000.0)  # it said 100 tokens, used 10,000
    order = serve(queue, [cheap], 1)
    order += serve(queue, [t for t in waiting if t.state == "granted"], 1)
    assert order == ["other", "other"]  # "cheap" is behind by what it really used


def test_the_retry_after_estimate_follows_how_fast_slots_free_up() -> None:
    queue = ServerQueue(1, 100, 100)
    assert queue.drain_seconds(0) == 1.0  # nothing measured: a second each
    tickets = [ticket("a") for _ in range(6)]
    for one in tickets:
        queue.enter(one)
    for step, one in enumerate(tickets[:5]):
        queue.release(one, step * 0.5)
    assert queue.drain_seconds(3) == pytest.approx(2.0)  # four turns, half a second each


def test_a_failed_server_sends_its_waiters_elsewhere() -> None:
    queue = ServerQueue(1, 100, 100)
    holder, waiter = ticket("a"), ticket("b")
    queue.enter(holder)
    queue.enter(waiter)
    assert queue.evict() == [waiter]
    assert queue.waiting == 0 and queue.release(holder, 0.0) == []


def test_capacity_learned_later_applies_at_once() -> None:
    queue = ServerQueue(1, 100, 100)
    tickets = [ticket("a") for _ in range(3)]
    for one in tickets:
        queue.enter(one)
    assert queue.resize(3) == tickets[1:]


def test_a_tier_above_the_keys_is_served_at_the_keys_highest() -> None:
    assert granted_tier("priority", "default", "default") == "default"
    assert granted_tier(None, "flex", "flex") == "flex"
    assert granted_tier("auto", "default", "priority") == "default"
    assert granted_tier("flex", "default", "priority") == "flex"
    assert granted_tier("priority", "default", "priority") == "priority"
    assert granted_tier("scale", "default", "default") == "default"


def test_slots_share_a_servers_capacity_among_processes_without_redis() -> None:
    slots = Slots(Waits(), processes=4)
    assert slots.share(8) == 2 and slots.share(2) == 1
    place = Place("team", 1.0, "default", 10.0)
    first = slots.take("http://w", "m", 8, place, lambda: False)
    second = slots.take("http://w", "m", 8, place, lambda: False)
    assert [s["in_flight"] for s in slots.snapshot()] == [2]
    full = Slots(Waits(max_waiting=0), processes=4)
    full.take("http://w", "m", 4, place, lambda: False)  # its one slot of four
    with pytest.raises(RateLimitExceeded) as refused:  # the next would wait: past 0, 429
        full.take("http://w", "m", 4, place, lambda: False)
    assert refused.value.status == 429 and refused.value.code == "rate_limit_exceeded"
    assert refused.value.headers["Retry-After"] == "1"
    first.release(5.0)
    second.release()
    second.release()
    assert [s["in_flight"] for s in slots.snapshot()] == [0]


def test_a_padded_prompt_refunded_at_the_end_buys_no_turns() -> None:
    queue = ServerQueue(1, 1000, 1000)
    padded = ticket("cheat", cost=4_000_000.0)  # a body of whitespace, counted as prompt
    assert queue.enter(padded)
    others = [ticket("honest") for _ in range(3)]
    for one in others:
        queue.enter(one)
    queue.settle(padded, 50.0)  # it really used 50 tokens
    later = [ticket("cheat") for _ in range(3)]
    for one in later:
        queue.enter(one)
    order = serve(queue, [padded], 1)
    held = [t for t in others + later if t.state == "granted"]
    order += serve(queue, held, 3)
    assert order.count("cheat") <= 2  # alternating, not every turn


def test_a_request_takes_a_slot_per_generation_it_runs_at_once() -> None:
    queue = ServerQueue(4, 100, 100)
    wide = Ticket("a", 1.0, RANK["default"], 10.0, size=3)  # n=3
    assert queue.enter(wide) and queue.in_flight == 3
    pair, single = Ticket("b", 1.0, 1, 10.0, size=2), ticket("c")
    assert not queue.enter(pair)  # two do not fit in the one left
    assert not queue.enter(single)  # nor may a later one pass it
    assert queue.release(wide, 0.0) == [pair, single]
    huge = Ticket("d", 1.0, 1, 10.0, size=50)  # more than the server: all of it, alone
    assert not queue.enter(huge) and huge.size == 4

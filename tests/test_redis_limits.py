"""The Redis limiter's script against a real Redis (Debian's, started on an ephemeral port):
it reserves, caps, refuses and settles as the in-memory limiter does (the same rules,
``app.access.reservations``, mirrored in Lua), and keeps budgets in this process alone
when Redis cannot be reached."""
from __future__ import annotations

import secrets
from typing import Iterator

import pytest

from app.access.limits import KeyLimits, MemoryLimiter, Verdict
from app.access.redis_limits import RedisLimiter
from app.access.reservations import Ask
from tests.conftest import wait_for
from tests.databases import Redis, redis_server
from tests.nginx import free_port


@pytest.fixture(scope="module")
def redis() -> Iterator[Redis]:
    with redis_server() as server:
        yield server


def both(redis: Redis) -> list[RedisLimiter | MemoryLimiter]:
    return [RedisLimiter(redis.url, tpm_estimate=256), MemoryLimiter(1, 256)]


def outcome(verdict: Verdict) -> tuple[object, ...]:
    return (verdict.allowed, verdict.reason, verdict.cap, verdict.never,
            verdict.reservation.budget, verdict.reservation.slots,
            verdict.reservation.tokens if verdict.reservation.counted else None,
            verdict.left, verdict.spent_out)


def test_the_script_reserves_caps_and_refuses_as_the_memory_limiter(redis: Redis) -> None:
    limits = KeyLimits(tpm=900, max_parallel=4, budget=100, period="day")
    asks = [Ask(10, None, 2, 2048), Ask(10, None, 1, 2048), Ask(10, 20, 1),
            Ask(10, None, 5), Ask(100, 400, 2)]
    results = []
    for limiter in both(redis):
        key = "key_" + secrets.token_hex(4)
        results.append([outcome(limiter.admit(key, limits, ask, 0)) for ask in asks])
    assert results[0] == results[1]
    first = results[0][0]
    assert first[:3] == (True, None, 45)  # (100 - 10) // 2 per choice
    assert results[0][1][1] == "budget"  # held by the first: not spent
    assert results[0][3][:2] == (False, "budget")


def test_settling_gives_back_what_was_not_used(redis: Redis) -> None:
    limits = KeyLimits(tpm=1000, max_parallel=2, budget=100, period="month")
    for limiter in both(redis):
        key = "key_" + secrets.token_hex(4)
        first = limiter.admit(key, limits, Ask(10, None, 2, 2048), 0)
        assert first.allowed and first.cap == 45
        limiter.settle(key, first.reservation, 30)
        again = limiter.admit(key, limits, Ask(10, None, 2, 2048), 0 if isinstance(
            limiter, RedisLimiter) else 30)  # Redis counts what was spent itself
        assert again.allowed and again.cap == (100 - 30 - 10) // 2, type(limiter)
        assert again.tokens is not None and again.tokens.remaining < 1000


def test_a_spent_budget_is_started_from_the_database_and_kept_in_redis(redis: Redis) -> None:
    limiter = RedisLimiter(redis.url)
    key = "key_" + secrets.token_hex(4)
    limits = KeyLimits(budget=50, period="day")
    spent = limiter.admit(key, limits, Ask(5, None), 48)  # the database's sum: 48
    assert (spent.allowed, spent.reason, spent.spent_out) == (False, "budget", True)
    # The period's counter now exists: what this process thinks no longer matters.
    assert not limiter.admit(key, limits, Ask(5, None), 0).allowed


def test_parallel_slots_count_choices_and_a_ticket_holds_nothing(redis: Redis) -> None:
    limiter = RedisLimiter(redis.url)
    key = "key_" + secrets.token_hex(4)
    limits = KeyLimits(rpm=2, max_parallel=3)
    ticket = limiter.admit(key, limits, Ask(1, None, reserves=False), 0)
    assert ticket.allowed and ticket.reservation.slots == 0
    stream = limiter.admit(key, limits, Ask(1, None, 3, counts_request=False), 0)
    assert stream.allowed and stream.reservation.slots == 3
    busy = limiter.admit(key, limits, Ask(1, None, 1), 0)
    assert (busy.allowed, busy.reason) == (False, "parallel")
    limiter.settle(key, stream.reservation, 10)
    assert limiter.admit(key, limits, Ask(1, None, 3), 0).allowed
    assert limiter.admit(key, limits, Ask(1, None, 1), 0).reason == "requests"


def test_without_redis_rates_go_unchecked_but_budgets_hold() -> None:
    limiter = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0")
    limits = KeyLimits(rpm=1, budget=30, period="day")
    first = limiter.admit("key_x", limits, Ask(10, None, 1, 2048), 0)
    assert first.allowed and first.cap == 20 and first.reservation.local
    held = limiter.admit("key_x", limits, Ask(10, None, 1, 2048), 0)
    assert (held.allowed, held.reason) == (False, "budget")
    limiter.settle("key_x", first.reservation, 12)
    assert limiter.admit("key_x", limits, Ask(10, None, 1, 2048), 12).cap == 8
    assert limiter.admit("key_y", KeyLimits(rpm=1), Ask(1, 1), 0).allowed
    assert limiter.admit("key_y", KeyLimits(rpm=1), Ask(1, 1), 0).allowed  # unchecked


def pause(redis: Redis, seconds: float) -> None:
    import redis as client

    connection = client.Redis(port=redis.port)
    connection.client_pause(int(seconds * 1000))
    connection.close()


def checked_and_free(limiter: RedisLimiter, key: str, limits: KeyLimits) -> bool:
    """Redis answered (an unchecked admission has no windows) and the slot is free."""
    verdict = limiter.admit(key, limits, Ask(1, None, reserves=False), 0)
    return verdict.allowed and verdict.requests is not None


def test_a_reservation_answered_too_late_is_given_back(redis: Redis) -> None:
    limiter = RedisLimiter(redis.url)
    key = "key_" + secrets.token_hex(4)
    limits = KeyLimits(rpm=10_000, max_parallel=1)
    pause(redis, 4.0)  # longer than an admission waits
    unchecked = limiter.admit(key, limits, Ask(1, None), 0)
    assert unchecked.allowed and unchecked.requests is None
    # Once Redis answers, the slot the late admission took is freed again.
    wait_for(lambda: checked_and_free(limiter, key, limits), 20,
             "the late slot to be given back")


def test_a_settlement_during_a_blip_is_retried(redis: Redis) -> None:
    limiter = RedisLimiter(redis.url)
    key = "key_" + secrets.token_hex(4)
    limits = KeyLimits(rpm=10_000, max_parallel=1)
    held = limiter.admit(key, limits, Ask(1, None), 0)
    assert held.allowed and held.reservation.slots == 1
    pause(redis, 3.0)  # the settlement times out once, and is sent again
    limiter.settle(key, held.reservation, 5)
    wait_for(lambda: checked_and_free(limiter, key, limits), 20,
             "the settlement to reach Redis")


def test_a_settlement_sent_twice_is_applied_once(redis: Redis) -> None:
    """A settlement whose reply timed out is sent again: the budget is charged once."""
    import redis as client

    limiter = RedisLimiter(redis.url)
    key = "key_" + secrets.token_hex(4)
    limits = KeyLimits(budget=100, period="day")
    held = limiter.admit(key, limits, Ask(10, None, 1, 2048), 0)
    for _ in range(2):
        limiter.settle(key, held.reservation, 30)
    limiter.drain()
    connection = client.Redis(port=redis.port)
    spent = connection.get(f"fc:{{{key}}}:b:{held.reservation.period}")
    connection.close()
    assert spent == b"30"

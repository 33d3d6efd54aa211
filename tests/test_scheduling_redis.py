"""The shared lines (app.scheduling.redis_slots) against a real redis-server, with two
RedisSlots standing for two gateway processes: capacity across them, fairness across
them, caps, a client that leaves, and Redis going away. Waits are on conditions."""
from __future__ import annotations

import threading
from typing import Any, Iterator

import pytest

from app.errors import RateLimitExceeded
from app.scheduling.redis_slots import RedisSlots
from app.scheduling.slots import Held, Place, Slots, Waits
from tests.conftest import wait_for
from tests.databases import Redis, redis_server
from tests.nginx import free_port

SERVER = "http://worker:21002"


@pytest.fixture(scope="module")
def redis() -> Iterator[Redis]:
    with redis_server() as server:
        yield server


def lines(url: str, **waits: Any) -> RedisSlots:
    settings = Waits(**waits)
    return RedisSlots(url, settings, Slots(settings, processes=2))


def place(tenant: str, tier: str = "default") -> Place:
    return Place(tenant, 1.0, tier, 10.0)


class Waiting:
    """A take() in a thread: what it got, or what it raised."""

    def __init__(self, slots: RedisSlots, server: str, capacity: int, who: Place,
                 gone: threading.Event | None = None) -> None:
        self.held: Held | None = None
        self.error: Exception | None = None
        self._gone = gone or threading.Event()
        self._thread = threading.Thread(target=self._run, args=(slots, server, capacity, who))
        self._thread.start()

    def _run(self, slots: RedisSlots, server: str, capacity: int, who: Place) -> None:
        try:
            self.held = slots.take(server, "m", capacity, who, self._gone.is_set)
        except Exception as exc:  # what the test looks at
            self.error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()


def test_two_processes_never_exceed_the_capacity_and_hand_slots_on(redis: Redis) -> None:
    one, two = lines(redis.url), lines(redis.url)
    server = SERVER + "/a"
    first = one.take(server, "m", 2, place("a"), lambda: False)
    second = two.take(server, "m", 2, place("b"), lambda: False)
    third = Waiting(two, server, 2, place("c"))
    wait_for(lambda: waiting_in(one, server) == 1, what="the third to wait")
    assert third.held is None
    first.release(20.0)  # freed in one process, granted in the other
    wait_for(third.done, what="the slot handed on")
    assert third.held is not None and third.error is None
    assert in_flight(one, server) == 2
    second.release()
    third.held.release()
    wait_for(lambda: in_flight(one, server) == 0, what="every slot back")


def test_the_least_served_tenant_goes_next_wherever_it_waits(redis: Redis) -> None:
    one, two = lines(redis.url), lines(redis.url)
    server = SERVER + "/b"
    holder = one.take(server, "m", 1, place("heavy"), lambda: False)
    heavy = [Waiting(one, server, 1, place("heavy")) for _ in range(3)]
    wait_for(lambda: waiting_in(one, server) == 3, what="heavy's backlog")
    light = Waiting(two, server, 1, place("light"))
    wait_for(lambda: waiting_in(one, server) == 4, what="light to wait")
    holder.release(100.0)  # its prompt (10, counted at the start) and a reply of 90
    wait_for(light.done, what="light's turn")
    assert light.held is not None and not any(w.done() for w in heavy)
    light.held.release(10.0)
    for waiter in heavy:  # the rest in turn
        wait_for(lambda: any(w.done() and w.held for w in heavy), what="heavy's turn")
        served = next(w for w in heavy if w.done() and w.held)
        heavy.remove(served)
        assert served.held is not None
        served.held.release(10.0)


def test_flex_waits_while_default_waits(redis: Redis) -> None:
    one = lines(redis.url)
    server = SERVER + "/c"
    holder = one.take(server, "m", 1, place("x"), lambda: False)
    flex = Waiting(one, server, 1, place("batch", "flex"))
    wait_for(lambda: waiting_in(one, server) == 1, what="flex to wait")
    default = Waiting(one, server, 1, place("y"))
    wait_for(lambda: waiting_in(one, server) == 2, what="default to wait")
    holder.release()
    wait_for(default.done, what="default first")
    assert not flex.done() and default.held is not None
    default.held.release()
    wait_for(flex.done, what="then flex")
    assert flex.held is not None
    flex.held.release()


def test_past_the_teams_cap_a_429_and_a_client_that_leaves_frees_its_place(
        redis: Redis) -> None:
    one = lines(redis.url, max_waiting_per_tenant=1)
    server = SERVER + "/d"
    holder = one.take(server, "m", 1, place("t"), lambda: False)
    gone = threading.Event()
    leaver = Waiting(one, server, 1, place("t"), gone)
    wait_for(lambda: waiting_in(one, server) == 1, what="one waiting")
    with pytest.raises(RateLimitExceeded) as refused:
        one.take(server, "m", 1, place("t"), lambda: False)
    assert refused.value.headers["Retry-After"].isdigit()
    gone.set()
    wait_for(leaver.done, what="the leaver to go")
    assert leaver.held is None and type(leaver.error).__name__ == "ClientClosedRequest"
    assert waiting_in(one, server) == 0
    holder.release()
    wait_for(lambda: in_flight(one, server) == 0, what="the slot back, to nobody")


def test_without_redis_each_process_uses_its_share() -> None:
    down = lines(f"redis://127.0.0.1:{free_port()}/0")
    server = SERVER + "/e"
    first = down.take(server, "m", 4, place("a"), lambda: False)  # its share: 2 of 4
    second = down.take(server, "m", 4, place("a"), lambda: False)
    assert [s["in_flight"] for s in down.snapshot()] == [2]
    first.release()
    second.release()


def waiting_in(slots: RedisSlots, server: str) -> int:
    shown = next(s for s in slots.snapshot() if s["server"] == server)
    return sum(w["requests"] for w in shown["waiting"])


def in_flight(slots: RedisSlots, server: str) -> int:
    shown = next(s for s in slots.snapshot() if s["server"] == server)
    count: int = shown["in_flight"]
    return count


def test_a_redis_restart_puts_the_waiting_requests_back_in_line(redis: Redis) -> None:
    import redis as redis_client

    one = lines(redis.url)
    server = SERVER + "/f"
    holder = one.take(server, "m", 1, place("a"), lambda: False)
    waiter = Waiting(one, server, 1, place("b"))
    wait_for(lambda: waiting_in(one, server) == 1, what="one waiting")
    redis_client.Redis(port=redis.port).flushall()  # what a restart without saving does
    # Its poll finds Redis lost it: it enters again, and gets the slot Redis forgot.
    wait_for(waiter.done, what="the waiter back in line and served")
    assert waiter.held is not None
    waiter.held.release()
    holder.release()


def test_n_generations_take_n_slots(redis: Redis) -> None:
    one = lines(redis.url)
    server = SERVER + "/g"
    wide = one.take(server, "m", 2, Place("a", 1.0, "default", 10.0, size=2), lambda: False)
    assert in_flight(one, server) == 2
    waiter = Waiting(one, server, 2, place("b"))
    wait_for(lambda: waiting_in(one, server) == 1, what="the next to wait")
    wide.release()
    wait_for(waiter.done, what="its turn")
    assert waiter.held is not None and in_flight(one, server) == 1
    waiter.held.release()

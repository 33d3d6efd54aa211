"""RefreshingCache: stale values served while one refresh runs; a failed first load is not
retried by every request for a ttl."""
from __future__ import annotations

import pytest

from app.errors import WorkerUnreachable
from app.upstream.cache import RefreshingCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_failed_load_fails_fast_for_a_ttl_then_is_tried_again() -> None:
    clock = Clock()
    calls = []
    up = False

    def load(key: str) -> str:
        calls.append(key)
        if not up:
            raise WorkerUnreachable("Could not connect to the controller (refused).")
        return "models"

    cache: RefreshingCache[str, str] = RefreshingCache(load, ttl=3.0, clock=clock)
    for _ in range(5):
        with pytest.raises(WorkerUnreachable, match="refused"):
            cache.get("")
    assert len(calls) == 1  # one wait for a dead server, not five
    assert "refused" in cache.errors[""]
    up = True
    clock.now += 3.5
    assert cache.get("") == "models"
    assert len(calls) == 2 and "" not in cache.errors
    # An explicit load (a forced refresh) always asks.
    assert cache.load("") == "models" and len(calls) == 3

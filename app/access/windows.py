"""Sliding-window counters for per-minute limits (the algorithm the ``limits`` library and
Cloudflare use): the count is the current fixed minute's plus the previous one's, weighted
by how much of it still lies in the last 60 s, so a limit holds over any minute without a
list of timestamps. Pure arithmetic on counts and a time: shared by the in-memory counters
and (mirrored in Lua) by the Redis ones."""
from __future__ import annotations

import math
from dataclasses import dataclass

WINDOW = 60.0


@dataclass(slots=True)  # made per request: slots, not frozen, for a cheap __init__
class Window:
    """One limit's state, for the x-ratelimit-* headers."""

    limit: int
    remaining: int
    reset: float  # seconds until the count is back to zero


def position(now: float) -> tuple[int, float]:
    """The current fixed minute and how far into it ``now`` is (0..1)."""
    return int(now // WINDOW), (now % WINDOW) / WINDOW


def count(previous: float, current: float, fraction: float) -> float:
    return previous * (1.0 - fraction) + current


def wait(previous: float, current: float, fraction: float, limit: int, cost: int) -> float:
    """Seconds until ``cost`` more fits under ``limit`` (a minute if it never does: the
    refusal says so)."""
    room = limit - cost - current
    if room >= 0:  # within this minute, as the previous one slides out
        if previous <= 0:
            return 0.0
        return max(0.0, (1.0 - fraction) - room / previous) * WINDOW
    if cost > limit:
        return WINDOW
    # next minute: this one becomes the previous and slides out in turn
    return (1.0 - fraction) * WINDOW + max(0.0, 1.0 - (limit - cost) / current) * WINDOW


def reset(previous: float, current: float, fraction: float) -> float:
    if current > 0:
        return (1.0 - fraction) * WINDOW + WINDOW
    return (1.0 - fraction) * WINDOW if previous > 0 else 0.0


def window(limit: int, previous: float, current: float, fraction: float) -> Window:
    used = count(previous, current, fraction)
    return Window(limit, max(int(limit - math.ceil(used)), 0),
                  reset(previous, current, fraction))

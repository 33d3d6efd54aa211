"""Per-key rate limits: requests and tokens per minute, and requests in parallel.

Minutes are sliding-window counters (the algorithm the ``limits`` library and Cloudflare
use): the count is the current fixed minute's plus the previous one's, weighted by how
much of it still lies in the last 60 s, so the limit holds over any minute without a list
of timestamps. Counters live in this process's memory (one process; with several and no
Redis, each takes its share of a limit), or in Redis, where one Lua script checks and
counts every limit of a request in one round trip.

Not the ``limits`` library itself: it checks one limit per call, which with Redis is a
round trip per limit, and a request here checks up to three at once and settles its
tokens when it ends.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

WINDOW = 60.0
REDIS_WAIT = 2.5  # seconds an admission waits for Redis before letting the request in
REDIS_RETRY_DOWN = 1.0  # seconds between tries while Redis is unreachable
LEASE_SECONDS = 900.0  # a parallel slot its request never gave back (a killed process)
log = logging.getLogger("flaskchat.limits")


@dataclass(frozen=True)
class KeyLimits:
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None

    def __bool__(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_parallel)

    def share(self, processes: int) -> "KeyLimits":
        """Each process's part when the processes cannot count together."""
        def part(limit: int | None) -> int | None:
            return max(limit // processes, 1) if limit else limit
        return KeyLimits(part(self.rpm), part(self.tpm), part(self.max_parallel))


@dataclass(slots=True)  # made per request: slots, not frozen, for a cheap __init__
class Window:
    """One limit's state, for the x-ratelimit-* headers."""

    limit: int
    remaining: int
    reset: float  # seconds until the count is back to zero


@dataclass(slots=True)
class Verdict:
    allowed: bool
    reason: str | None = None  # "requests", "tokens" or "parallel" when refused
    retry_after: float = 0.0  # seconds, when refused
    requests: Window | None = None
    tokens: Window | None = None


ALLOWED = Verdict(True)


class Limiter(Protocol):
    def admit(self, key: str, limits: KeyLimits, tokens: int, lease: str) -> Verdict: ...
    def settle(self, key: str, limits: KeyLimits, tokens: int, lease: str | None) -> None: ...


# ---- the sliding window, shared by both counters ------------------------------------------

def _position(now: float) -> tuple[int, float]:
    """The current fixed minute and how far into it we are (0..1)."""
    return int(now // WINDOW), (now % WINDOW) / WINDOW


def _count(previous: float, current: float, fraction: float) -> float:
    return previous * (1.0 - fraction) + current


def _wait(previous: float, current: float, fraction: float, limit: int, cost: int) -> float:
    """Seconds until ``cost`` more fits under ``limit``."""
    room = limit - cost - current
    if room >= 0:  # within this minute, as the previous one slides out
        if previous <= 0:
            return 0.0
        return max(0.0, (1.0 - fraction) - room / previous) * WINDOW
    if cost > limit:
        return WINDOW  # it never fits; the refusal says so
    # next minute: this one becomes the previous and slides out in turn
    return (1.0 - fraction) * WINDOW + max(0.0, 1.0 - (limit - cost) / current) * WINDOW


def _reset(previous: float, current: float, fraction: float) -> float:
    if current > 0:
        return (1.0 - fraction) * WINDOW + WINDOW
    return (1.0 - fraction) * WINDOW if previous > 0 else 0.0


def _window(limit: int, previous: float, current: float, fraction: float) -> Window:
    used = _count(previous, current, fraction)
    remaining = max(int(limit - math.ceil(used)), 0)
    return Window(limit, remaining, _reset(previous, current, fraction))


def verdict(limits: KeyLimits, fraction: float, requests: tuple[float, float],
            tokens: tuple[float, float], cost: int, in_flight: int) -> Verdict:
    """The decision from the counts before this request: (previous, current) minute per
    kind, and the parallel slots taken."""
    reason, retry = None, 0.0
    if limits.rpm and _count(*requests, fraction) + 1 > limits.rpm:
        reason, retry = "requests", _wait(*requests, fraction, limits.rpm, 1)
    elif limits.tpm and _count(*tokens, fraction) + cost > limits.tpm:
        reason, retry = "tokens", _wait(*tokens, fraction, limits.tpm, cost)
    elif limits.max_parallel and in_flight >= limits.max_parallel:
        reason, retry = "parallel", 1.0
    taken_r, taken_t = (0, 0) if reason else (1, cost)
    return Verdict(
        reason is None, reason, retry,
        _window(limits.rpm, requests[0], requests[1] + taken_r, fraction) if limits.rpm else None,
        _window(limits.tpm, tokens[0], tokens[1] + taken_t, fraction) if limits.tpm else None)


# ---- one process ------------------------------------------------------------------------

class MemoryLimiter:
    """Counters in this process. ``processes``: how many share the limits without a common
    store; each enforces its share."""

    def __init__(self, processes: int = 1) -> None:
        self.processes = max(processes, 1)
        self._minutes: dict[tuple[str, str], list[float]] = {}  # -> [minute, prev, cur]
        self._leases: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def admit(self, key: str, limits: KeyLimits, tokens: int, lease: str) -> Verdict:
        limits = limits.share(self.processes) if self.processes > 1 else limits
        minute, fraction = _position(time.time())
        with self._lock:
            requests, tokens_used = self._slot(key, "r", minute), self._slot(key, "t", minute)
            leases = self._leases.setdefault(key, set())
            decided = verdict(limits, fraction, (requests[1], requests[2]),
                              (tokens_used[1], tokens_used[2]), tokens, len(leases))
            if decided.allowed:
                requests[2] += 1
                tokens_used[2] += tokens
                if limits.max_parallel:
                    leases.add(lease)
        return decided

    def settle(self, key: str, limits: KeyLimits, tokens: int, lease: str | None) -> None:
        minute, _ = _position(time.time())
        with self._lock:
            if tokens and limits.tpm:
                slot = self._slot(key, "t", minute)
                slot[2] = max(slot[2] + tokens, 0.0)
            if lease is not None:
                self._leases.get(key, set()).discard(lease)

    def _slot(self, key: str, kind: str, minute: int) -> list[float]:
        slot = self._minutes.get((key, kind))
        if slot is None:
            slot = self._minutes[(key, kind)] = [minute, 0.0, 0.0]
        elif slot[0] != minute:  # roll: the current minute becomes the previous one
            slot[1] = slot[2] if slot[0] == minute - 1 else 0.0
            slot[2] = 0.0
            slot[0] = minute
        return slot


# ---- several processes and hosts --------------------------------------------------------

@dataclass
class _Call:
    """One script call on its way to Redis; ``done`` is set when its answer is in."""

    script: Any
    keys: list[str]
    args: list[Any]
    done: threading.Event | None
    result: Any = None


_ADMIT = """
local rl, tl, cost, pl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local function counts(cur, prev)
  return tonumber(redis.call('GET', prev) or '0'), tonumber(redis.call('GET', cur) or '0')
end
local rp, rc, tp, tc, inflight = 0, 0, 0, 0, 0
if rl > 0 then rp, rc = counts(KEYS[1], KEYS[2]) end
if tl > 0 then tp, tc = counts(KEYS[3], KEYS[4]) end
if pl > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ARGV[1])
  inflight = redis.call('ZCARD', KEYS[5])
end
local frac = tonumber(ARGV[2])
local ok = not ((rl > 0 and rp * (1 - frac) + rc + 1 > rl)
  or (tl > 0 and tp * (1 - frac) + tc + cost > tl) or (pl > 0 and inflight >= pl))
if ok then
  if rl > 0 then redis.call('INCR', KEYS[1]); redis.call('EXPIRE', KEYS[1], 130) end
  if tl > 0 and cost > 0 then
    redis.call('INCRBY', KEYS[3], cost); redis.call('EXPIRE', KEYS[3], 130)
  end
  if pl > 0 then
    redis.call('ZADD', KEYS[5], ARGV[8], ARGV[7]); redis.call('EXPIRE', KEYS[5], ARGV[9])
  end
end
return {tostring(rp), tostring(rc), tostring(tp), tostring(tc), inflight}
"""

_SETTLE = """
if tonumber(ARGV[1]) ~= 0 then
  local left = redis.call('INCRBY', KEYS[1], ARGV[1])
  if left < 0 then redis.call('SET', KEYS[1], 0) end
  redis.call('EXPIRE', KEYS[1], 130)
end
if ARGV[2] ~= '' then redis.call('ZREM', KEYS[2], ARGV[2]) end
return 0
"""


class RedisLimiter:
    """Counters in Redis, shared by every process and host that uses it. If Redis cannot be
    reached, requests go through unlimited (and it is logged): the limits protect the
    workers, they are not worth taking every team offline.

    The calls of concurrent requests share round trips: while one pipeline is on the
    wire, the admissions and settlements that arrive queue up and go out together in the
    next (no timer: a lone request goes out at once). Under load a request costs a small
    part of a round trip instead of two whole ones."""

    def __init__(self, url: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._admit = self._redis.register_script(_ADMIT)
        self._settle = self._redis.register_script(_SETTLE)
        self._queue: list[_Call] = []
        self._wakeup = threading.Event()
        self._sender: threading.Thread | None = None
        self._failing_since: float | None = None
        self._tried_at = 0.0

    def admit(self, key: str, limits: KeyLimits, tokens: int, lease: str) -> Verdict:
        now = time.time()
        minute, fraction = _position(now)
        keys = [f"fc:{{{key}}}:r:{minute}", f"fc:{{{key}}}:r:{minute - 1}",
                f"fc:{{{key}}}:t:{minute}", f"fc:{{{key}}}:t:{minute - 1}", f"fc:{{{key}}}:p"]
        args: list[str | int | float] = [
            now, fraction, limits.rpm or 0, limits.tpm or 0, tokens, limits.max_parallel or 0,
            lease, now + LEASE_SECONDS, int(LEASE_SECONDS) + 60]
        call = _Call(self._admit, keys, args, threading.Event())
        self._send(call)
        assert call.done is not None
        if not call.done.wait(REDIS_WAIT) or isinstance(call.result, Exception):
            return ALLOWED  # Redis is slow or down (logged by the sender): let it in
        raw: Any = call.result
        rp, rc, tp, tc = (float(value) for value in raw[:4])
        return verdict(limits, fraction, (rp, rc), (tp, tc), tokens, int(raw[4]))

    def settle(self, key: str, limits: KeyLimits, tokens: int, lease: str | None) -> None:
        """Queued, not waited for: the request is over."""
        if not (tokens and limits.tpm) and lease is None:
            return
        minute, _ = _position(time.time())
        self._send(_Call(self._settle, [f"fc:{{{key}}}:t:{minute}", f"fc:{{{key}}}:p"],
                         [tokens if limits.tpm else 0, lease or ""], None))

    def _send(self, call: "_Call") -> None:
        self._queue.append(call)
        if self._sender is None or not self._sender.is_alive():
            self._sender = threading.Thread(target=self._run, name="redis-limits",
                                            daemon=True)
            self._sender.start()
        self._wakeup.set()

    def _run(self) -> None:
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch, self._queue = self._queue, []
                self._round_trip(batch)

    def _round_trip(self, batch: list["_Call"]) -> None:
        results: list[Any]
        if self._failing_since is not None and \
                time.monotonic() - self._tried_at < REDIS_RETRY_DOWN:
            # Down a moment ago: no connect timeout for every request while it stays down.
            results = [ConnectionError("Redis is unreachable")] * len(batch)
        else:
            self._tried_at = time.monotonic()
            pipe = self._redis.pipeline(transaction=False)
            for call in batch:
                call.script(keys=call.keys, args=call.args, client=pipe)
            try:
                results = pipe.execute(raise_on_error=False)
            except Exception as exc:  # redis' errors, whatever their kind
                results = [exc] * len(batch)
            failed = next((r for r in results if isinstance(r, Exception)), None)
            if failed is not None:
                self._failed(failed)
            else:
                self._recovered()
        for call, result in zip(batch, results):
            if call.done is not None:
                call.result = result
                call.done.set()

    def _failed(self, exc: Exception) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.error("Redis is unreachable; rate limits are not enforced until it is back: "
                      "%s", exc)

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.warning("Redis is back after %.1f s; rate limits are enforced again",
                        time.monotonic() - self._failing_since)
            self._failing_since = None

"""Per-key limits counted in Redis, shared by every process and host that uses it: one Lua
script checks and reserves all of a request's limits in one round trip (the rules of
``app.access.reservations`` and ``app.access.limits.decide``, line for line), and another
settles it when the request ends.

Keys, all in one hash slot per API key (``fc:{key}:...``): the requests and tokens of the
current and previous minute (expire after two minutes), the parallel slots (a sorted set
of leases that expire, so a killed process cannot hold them for ever), the budget spent
this period (made from the database's sums by the first request of the period that finds
it missing), and the budget held by requests in flight (leases again, each with its
amount).

Not the ``limits`` library: it checks one limit per call, which with Redis is a round trip
per limit, and a request here checks up to four at once and settles when it ends.
"""
from __future__ import annotations

import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from app.access.budgets import period_start
from app.access.limits import (ALLOWED, TPM_ESTIMATE, KeyLimits, MemoryLimiter, Reservation,
                               Verdict, budget_refusal, decide)
from app.access.redis_pipe import Call, Pipeline, Script
from app.access.reservations import Ask, Plan, completion_room
from app.access.windows import position

REDIS_WAIT = 2.5  # seconds an admission waits for Redis before letting the request in
LEASE_SECONDS = 900.0  # a slot or budget hold its request never gave back (a killed process)
MAX_HOLD = 86400.0  # the longest a request's slots and hold are renewed

_ADMIT = Script("""
local now, frac = tonumber(ARGV[1]), tonumber(ARGV[2])
local rl, tl, pl, bl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local prompt, completion, choices = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local ctxroom, estimate = tonumber(ARGV[10]), tonumber(ARGV[11])
local counts, reserves = ARGV[12] == '1', ARGV[13] == '1'
local lease, expiry, ttl = ARGV[14], ARGV[15], ARGV[16]
local ctxknown = ARGV[19] == '1'
local function pair(cur, prev)
  return tonumber(redis.call('GET', prev) or '0'), tonumber(redis.call('GET', cur) or '0')
end
local rp, rc, tp, tc, inflight = 0, 0, 0, 0, 0
if rl > 0 then rp, rc = pair(KEYS[1], KEYS[2]) end
if tl > 0 then tp, tc = pair(KEYS[3], KEYS[4]) end
if pl > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  inflight = redis.call('ZCARD', KEYS[5])
end
local room, unheld, held, cap, short = 0, 0, 0, -1, false
if bl > 0 then
  local spent = redis.call('GET', KEYS[6])
  if not spent then
    spent = ARGV[17]
    redis.call('SET', KEYS[6], spent, 'EX', ARGV[18])
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now)
  local holds = 0
  for _, member in ipairs(redis.call('ZRANGE', KEYS[7], 0, -1)) do
    holds = holds + tonumber(string.match(member, '|(%d+)$'))
  end
  unheld = bl - tonumber(spent)
  room = unheld - holds
  if completion >= 0 then
    held = prompt + completion * choices
    short = held > room
  else
    local per = math.floor((room - prompt) / choices)
    if per < 1 then short = true; held = prompt + choices
    elseif per < ctxroom or not ctxknown then
      cap = math.min(per, ctxroom); held = prompt + cap * choices
    else held = prompt + ctxroom * choices end
  end
end
local per_choice = completion
if completion < 0 then
  per_choice = estimate
  local bound = ctxroom
  if cap >= 0 then bound = cap end
  if bound < per_choice then per_choice = bound end
  if tl > 0 then
    local fits = math.floor((tl - prompt) / choices)
    if fits < per_choice then per_choice = fits end
    if per_choice < 0 then per_choice = 0 end
  end
end
local tokens = prompt + per_choice * choices
local reason = ''
if short then reason = 'budget'
elseif counts and rl > 0 and rp * (1 - frac) + rc + 1 > rl then reason = 'requests'
elseif tl > 0 and tp * (1 - frac) + tc + tokens > tl then reason = 'tokens'
elseif pl > 0 and inflight + choices > pl then reason = 'parallel' end
if reason == '' then
  if counts and rl > 0 then redis.call('INCR', KEYS[1]); redis.call('EXPIRE', KEYS[1], 130) end
  if reserves then
    if tl > 0 and tokens > 0 then
      redis.call('INCRBY', KEYS[3], tokens); redis.call('EXPIRE', KEYS[3], 130)
    end
    if pl > 0 then
      for i = 1, choices do redis.call('ZADD', KEYS[5], expiry, lease .. ':' .. i) end
      redis.call('EXPIRE', KEYS[5], ttl)
    end
    if bl > 0 then
      redis.call('ZADD', KEYS[7], expiry, lease .. '|' .. string.format('%d', held))
      redis.call('EXPIRE', KEYS[7], ttl)
    end
  end
end
return {tostring(rp), tostring(rc), tostring(tp), tostring(tc), inflight, reason,
        string.format('%d', cap), string.format('%d', held), string.format('%d', tokens),
        string.format('%d', room), string.format('%d', unheld)}
""")

# Settles an admitted request, once: a budget's hold (or, for a request admitted while
# Redis was away, a marker) is what says it was not settled yet, so a settlement sent again
# after a reply that timed out is not applied twice (what only corrects tpm may be: it is
# a rate, and the window forgets it within two minutes). What it used past its reservation
# counts in the current minute; what it gives back, in the minute it was reserved in.
_SETTLE = Script("""
if ARGV[4] ~= '' then
  if redis.call('ZREM', KEYS[5], ARGV[2] .. '|' .. ARGV[4]) == 0 then return 0 end
elseif ARGV[7] == '1' then
  if not redis.call('SET', KEYS[6], '1', 'NX', 'EX', 600) then return 0 end
end
local delta = tonumber(ARGV[1])
if delta < 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  local left = redis.call('INCRBY', KEYS[1], delta)
  if left < 0 then redis.call('SET', KEYS[1], 0, 'KEEPTTL') end
elseif delta > 0 then
  redis.call('INCRBY', KEYS[2], delta)
  redis.call('EXPIRE', KEYS[2], 130)
end
for i = 1, tonumber(ARGV[3]) do redis.call('ZREM', KEYS[3], ARGV[2] .. ':' .. i) end
if ARGV[6] == '1' and redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('INCRBY', KEYS[4], ARGV[5])
end
return 1
""")

# Gives back what an admission may have reserved when its request went on without it
# (Redis answered too late, or not at all): its slots and its budget hold.
_RELEASE = Script("""
for i = 1, tonumber(ARGV[2]) do redis.call('ZREM', KEYS[1], ARGV[1] .. ':' .. i) end
local prefix = ARGV[1] .. '|'
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if string.sub(member, 1, #prefix) == prefix then redis.call('ZREM', KEYS[2], member) end
end
return 0
""")

_RENEW = Script("""
for i = 1, tonumber(ARGV[3]) do redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[2] .. ':' .. i) end
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[2], 'XX', ARGV[1], ARGV[2] .. '|' .. ARGV[4]) end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 0
""")


def _period_seconds_left(period: str | None, at: datetime) -> int:
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        following = (day.replace(day=28) + timedelta(days=4)).replace(day=1)
    else:
        following = day + timedelta(days=1)
    return int((following - at).total_seconds()) + 86400  # a day's margin


class RedisLimiter:
    """If Redis cannot be reached (or answers later than REDIS_WAIT), the rates go
    unlimited (and it is logged): they protect the workers, and are not worth taking every
    team offline. Budgets are money: they are then kept by this process alone (its share
    of what is left, with ``processes`` sharing), and what they spend is charged to Redis
    too once it is back. What such an admission may still have reserved in Redis is given
    back.

    Parallel slots and budget holds are leases that expire (LEASE_SECONDS), so that a
    killed process cannot hold them for ever; this process renews those of its requests
    in flight every third of that, for up to MAX_HOLD."""

    def __init__(self, url: str, tpm_estimate: int = TPM_ESTIMATE, processes: int = 1) -> None:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._estimate = tpm_estimate
        self._local = MemoryLimiter(processes, tpm_estimate)  # budgets while Redis is down
        # lease -> (key, what it holds, when it was admitted): what renewals renew
        self._held: dict[str, tuple[str, Reservation, float]] = {}
        self._pipe = Pipeline(client, (_ADMIT, _SETTLE, _RELEASE, _RENEW), self._renewals,
                              LEASE_SECONDS / 3)

    def admit(self, key: str, limits: KeyLimits, ask: Ask, spent: int) -> Verdict:
        now = time.time()
        minute, fraction = position(now)
        period, ttl = "", 0
        if limits.budget:
            at = datetime.fromtimestamp(now, timezone.utc)
            period, ttl = period_start(limits.period, at), _period_seconds_left(limits.period, at)
        lease = secrets.token_hex(8) if limits.max_parallel or limits.budget else ""
        call = Call(_ADMIT, _keys(key, minute, period), [
            now, fraction, limits.rpm or 0, limits.tpm or 0, limits.max_parallel or 0,
            limits.budget or 0, ask.prompt,
            ask.completion if ask.completion is not None else -1, ask.choices,
            completion_room(ask), self._estimate, int(ask.counts_request), int(ask.reserves),
            lease, now + LEASE_SECONDS, int(LEASE_SECONDS) + 60, spent, ttl,
            int(ask.context is not None)], threading.Event())
        answer = self._pipe.ask(call, REDIS_WAIT)
        if answer is None or isinstance(answer, Exception):
            # Redis is slow or down (logged by the pipeline): rates go unchecked, budgets
            # are checked here alone. Whatever the admission may yet reserve there is
            # given back (queued after it, so run after it).
            if lease:
                keys = _keys(key, minute, period)
                self._pipe.send(Call(_RELEASE, [keys[4], keys[6]], [lease, ask.choices],
                                     None))
            if not limits.budget:
                return ALLOWED
            decided = self._local.admit(key, KeyLimits(budget=limits.budget), ask, spent)
            reservation = decided.reservation
            reservation.local, reservation.period, reservation.lease = True, period, lease
            return decided
        decided = self._verdict(answer, limits, ask, fraction, lease, period)
        reservation = decided.reservation
        reservation.minute = minute
        if reservation.slots or reservation.budget:
            self._held[lease] = (key, reservation, now)
        return decided

    def _verdict(self, raw: Any, limits: KeyLimits, ask: Ask, fraction: float,
                 lease: str, period: str) -> Verdict:
        rp, rc, tp, tc = (float(value) for value in raw[:4])
        reason = raw[5].decode() if isinstance(raw[5], bytes) else str(raw[5])
        cap, held, tokens, room, unheld = (int(value) for value in raw[6:11])
        planned = Plan(tokens, held, cap if cap >= 0 else None, reason == "budget")
        decided = decide(limits, fraction, (rp, rc), (tp, tc), int(raw[4]), ask, planned)
        if reason == "budget":
            return budget_refusal(decided, ask, room, unheld)
        if not decided.allowed or not ask.reserves:
            return decided
        reservation = decided.reservation
        reservation.lease = lease
        if limits.tpm:
            reservation.tokens, reservation.counted = tokens, tokens > 0
        if limits.max_parallel:
            reservation.slots = ask.choices
        if limits.budget:
            reservation.budget, reservation.period = held, period
        return decided

    def settle(self, key: str, reservation: Reservation, used: int) -> None:
        """Queued, not waited for: the request is over. What a budget spent is charged to
        the period the request was admitted in (one that ends after midnight counts for
        the day it began, as its usage record does)."""
        self._held.pop(reservation.lease, None)
        charge, marked = bool(reservation.budget), False
        if reservation.local:  # admitted here alone: its spending still goes to Redis
            self._local.settle(key, reservation, used)
            marked = charge
            reservation = Reservation(lease=reservation.lease, period=reservation.period)
        tokens = used - reservation.tokens if reservation.counted else 0
        if not tokens and not reservation.slots and not charge:
            return
        base = _keys(key, reservation.minute, reservation.period)
        keys = [base[2], _keys(key, position(time.time())[0], "")[2], base[4], base[5], base[6],
                f"fc:{{{key}}}:c:{reservation.lease}"]
        self._pipe.send(Call(_SETTLE, keys, [
            tokens, reservation.lease, reservation.slots,
            str(reservation.budget) if reservation.budget else "", used, int(charge),
            int(marked)], None))

    def drain(self) -> None:
        """On a graceful stop: what is still queued for Redis (settlements) goes first."""
        self._pipe.drain()

    def _renewals(self) -> list[Call]:
        """Renewal calls for the slots and budget holds of this process's requests in
        flight (run by the pipeline's thread; dropped if Redis fails, made again later)."""
        now = time.time()
        calls = []
        for lease, (key, reservation, admitted_at) in list(self._held.items()):
            if now - admitted_at > MAX_HOLD:  # its settlement was lost: let it expire
                self._held.pop(lease, None)
                continue
            keys = _keys(key, 0, "")
            calls.append(Call(_RENEW, [keys[4], keys[6]], [
                now + LEASE_SECONDS, lease, reservation.slots,
                str(reservation.budget) if reservation.budget else "",
                int(LEASE_SECONDS) + 60], None, retried=False))
        return calls


def _keys(key: str, minute: int, period: str) -> list[str]:
    base = f"fc:{{{key}}}"
    return [f"{base}:r:{minute}", f"{base}:r:{minute - 1}", f"{base}:t:{minute}",
            f"{base}:t:{minute - 1}", f"{base}:p", f"{base}:b:{period}", f"{base}:bh"]

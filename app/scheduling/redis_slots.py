"""Model servers' slots and lines shared through Redis by every gateway process and host
that uses it: the fleet never sends a server more than its capacity, and fairness holds
wherever a request lands. The rules are ``fair_queue.ServerQueue``'s, in Lua.

Round trips, for a request to a server whose capacity is known: one when it gets a slot
at once (``ENTER``), and its release goes out without waiting for an answer (pipelined
with other calls). A request that waits learns it holds a slot from a message on one
pub/sub channel (``GRANTED``), and each process asks for its waiting requests every
``POLL`` seconds in case a message was missed (one call per server); leaving the line
early is one more (``CANCEL``).

Keys, per server, under ``fc:q:{server}:`` (one hash slot): ``inflight`` (a sorted set of
leases, which expire, so a killed process cannot hold a slot for ever; renewed every
third of ``LEASE``), ``t`` (each ticket: tenant, tier, cost, weight, alive-until, seq),
``lines:R`` (the tenants waiting at tier R, scored by their counters), ``line:R:T``
(tenant T's waiting tickets, in order), ``c:R`` (the counters), ``hold`` (slots each
tenant holds), ``last:R``, ``wait`` (waiting per tenant) and ``waiting``. A waiting
ticket stays alive while its process polls; one whose process died is skipped.

If Redis cannot be reached, this process falls back to its share of each server
(``Slots``), and says so in its log, as the limits do.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any, Callable

from app.access.redis_pipe import Call, Pipeline, Script
from app.errors import ClientClosedRequest
from app.scheduling.fair_queue import MAX_COST, MAX_LEAD
from app.scheduling.slots import (TICK, Held, Place, QueueObserver, ServerLeft, Slots,
                                  Waits, retry_after)
from app.scheduling.tiers import RANK, TIERS

log = logging.getLogger("flaskchat.queues")

LEASE = 60.0  # seconds a slot is held without renewal (a killed process's, at most)
ALIVE = 5.0  # seconds a waiting ticket lives without its process polling
POLL = 0.5  # seconds between a process's checks of its waiting requests
REDIS_WAIT = 2.5  # seconds to wait for Redis before using this process's share
CHANNEL = "fc:q:granted"
KEY_TTL = 86400  # seconds the keys of a server nobody uses any more are kept

_LIB = """
local P = ARGV[1]
local function num(v) return tonumber(v or '0') or 0 end
-- Redis's clock, not each host's: leases and liveness mean the same on every host
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function floor_of(rank, tenant)
  local least = redis.call('ZRANGE', P..':lines:'..rank, 0, 1, 'WITHSCORES')
  for i = 1, #least, 2 do
    if least[i] ~= tenant then return tonumber(least[i + 1]) end
  end
  return num(redis.call('GET', P..':last:'..rank))
end
local function rec(id)
  local r = redis.call('HGET', P..':t', id)
  if not r then return nil end
  local f = {}
  for part in string.gmatch(r, '[^\\t]+') do f[#f + 1] = part end
  return {tenant = f[1], rank = tonumber(f[2]), cost = tonumber(f[3]),
          weight = tonumber(f[4]), alive = tonumber(f[5]), seq = tonumber(f[6]),
          size = tonumber(f[7] or '1')}
end
local function put(id, r)
  redis.call('HSET', P..':t', id, r.tenant..'\\t'..r.rank..'\\t'..r.cost..'\\t'..r.weight..
             '\\t'..r.alive..'\\t'..r.seq..'\\t'..r.size)
end
-- slots in use: the sizes of the tickets holding them
local function used() return num(redis.call('GET', P..':used')) end
local function counter(rank, tenant) return num(redis.call('HGET', P..':c:'..rank, tenant)) end
local function set_counter(rank, tenant, value)
  redis.call('HSET', P..':c:'..rank, tenant, value)
  redis.call('ZADD', P..':lines:'..rank, 'XX', value, tenant)
end
local function purge(now)
  local expired = redis.call('ZRANGEBYSCORE', P..':inflight', '-inf', now)
  for _, id in ipairs(expired) do
    local r = rec(id)
    if r then
      redis.call('HINCRBY', P..':hold', r.tenant, -1)
      redis.call('DECRBY', P..':used', r.size)
    end
    redis.call('HDEL', P..':t', id)
    redis.call('ZREM', P..':inflight', id)
  end
end
local function hold(id, r, expiry)
  redis.call('ZADD', P..':inflight', expiry, id)
  redis.call('INCRBY', P..':used', r.size)
  redis.call('HINCRBY', P..':hold', r.tenant, 1)
  local c = counter(r.rank, r.tenant)
  redis.call('SET', P..':last:'..r.rank, c)
  set_counter(r.rank, r.tenant, c + r.cost / r.weight)
end
local function head_seq(rank, tenant)
  local id = redis.call('LINDEX', P..':line:'..rank..':'..tenant, 0)
  local r = id and rec(id)
  return r and r.seq or 0
end
-- the line whose head goes next: the highest tier, the least counter, the fewest slots
-- held, the earliest request
local function best()
  for rank = 0, 2 do
    local least = redis.call('ZRANGE', P..':lines:'..rank, 0, 0, 'WITHSCORES')
    if #least > 0 then
      local tied = redis.call('ZRANGEBYSCORE', P..':lines:'..rank, least[2], least[2],
                              'LIMIT', 0, 8)
      local pick, key = nil, nil
      for _, tenant in ipairs(tied) do
        local k = {num(redis.call('HGET', P..':hold', tenant)), head_seq(rank, tenant)}
        if not key or k[1] < key[1] or (k[1] == key[1] and k[2] < key[2]) then
          pick, key = tenant, k
        end
      end
      return rank, pick, tonumber(least[2]), key[1]
    end
  end
  return nil
end
local function unwait(rank, tenant)
  redis.call('DECR', P..':waiting')
  redis.call('HINCRBY', P..':wait', tenant, -1)
  if redis.call('EXISTS', P..':line:'..rank..':'..tenant) == 0 then
    redis.call('ZREM', P..':lines:'..rank, tenant)
  end
end
local function grant(capacity, now, lease)
  local granted = {}
  while used() < capacity do
    local rank, tenant = best()
    if not rank then break end
    local head = rec(redis.call('LINDEX', P..':line:'..rank..':'..tenant, 0) or '')
    if head and head.alive >= now and used() + head.size > capacity then
      break  -- the next one needs more slots than are free: it waits for them
    end
    local id = redis.call('LPOP', P..':line:'..rank..':'..tenant)
    unwait(rank, tenant)
    local r = id and rec(id)
    if r and r.alive >= now then
      hold(id, r, now + lease)
      granted[#granted + 1] = id
    elseif r then
      redis.call('HDEL', P..':t', id)  -- its process is gone
    end
  end
  if #granted > 0 then
    redis.call('PUBLISH', ARGV[2], P..'\\t'..table.concat(granted, ','))
  end
  return granted
end
local function touch(ttl)
  for _, name in ipairs({'inflight', 'used', 't', 'hold', 'wait', 'waiting', 'seq', 'c:0',
                         'c:1',
                         'c:2', 'lines:0', 'lines:1', 'lines:2', 'last:0', 'last:1',
                         'last:2'}) do
    redis.call('EXPIRE', P..':'..name, ttl)
  end
end
"""

# ARGV: prefix, channel, id, tenant, rank, cost, weight, capacity, (unused), lease, alive,
# max_waiting, max_per_tenant, retry, max_lead, ttl -> {1: granted | 0: waiting |
# -1: line full | -2: the tenant's line full, waiting}
_ENTER = Script(_LIB + """
local id, tenant = ARGV[3], ARGV[4]
local rank, cost, weight = tonumber(ARGV[5]), math.min(tonumber(ARGV[6]), tonumber(ARGV[17])),
  tonumber(ARGV[7])
local capacity, now, lease = tonumber(ARGV[8]), clock(), tonumber(ARGV[10])
local alive, maxw, maxt = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
local retry, maxlead = ARGV[14] == '1', tonumber(ARGV[15])
purge(now)
local line = P..':line:'..rank..':'..tenant
local own_line = redis.call('EXISTS', line) == 1
if not own_line then  -- it starts waiting: lifted to those waiting (or the last served)
  local floor = floor_of(rank, tenant)
  local c = counter(rank, tenant)
  c = math.min(math.max(c, floor), floor + maxlead)
  redis.call('HSET', P..':c:'..rank, tenant, c)
end
local r = {tenant = tenant, rank = rank, cost = cost, weight = weight, alive = now + alive,
           seq = redis.call('INCR', P..':seq'),
           size = math.max(math.min(tonumber(ARGV[18]), capacity), 1)}
if r.seq % 64 == 1 then touch(tonumber(ARGV[16])) end  -- now and then is enough
put(id, r)
local before = own_line
if not before then
  local brank, btenant, bcounter, bhold = best()
  if brank then
    local mine = {rank, counter(rank, tenant), num(redis.call('HGET', P..':hold', tenant))}
    before = brank < mine[1] or (brank == mine[1] and (bcounter < mine[2] or
             (bcounter == mine[2] and bhold <= mine[3])))
  end
end
local waiting = num(redis.call('GET', P..':waiting'))
if used() + r.size <= capacity and not before then
  hold(id, r, now + lease)
  return {1, waiting}
end
if waiting >= maxw then
  redis.call('HDEL', P..':t', id)
  return {-1, waiting}
end
if num(redis.call('HGET', P..':wait', tenant)) >= maxt then
  redis.call('HDEL', P..':t', id)
  return {-2, waiting}
end
if retry then redis.call('LPUSH', line, id) else redis.call('RPUSH', line, id) end
redis.call('EXPIRE', line, tonumber(ARGV[16]))
redis.call('ZADD', P..':lines:'..rank, counter(rank, tenant), tenant)
redis.call('INCR', P..':waiting')
redis.call('HINCRBY', P..':wait', tenant, 1)
return {0, waiting + 1}
""")

# ARGV: prefix, channel, id, used (-1: not known), capacity, (unused), lease -> granted ids
_RELEASE = Script(_LIB + """
local id, used = ARGV[3], tonumber(ARGV[4])
local capacity, now, lease = tonumber(ARGV[5]), clock(), tonumber(ARGV[7])
local r = rec(id)
if redis.call('ZREM', P..':inflight', id) == 1 and r then
  redis.call('HINCRBY', P..':hold', r.tenant, -1)
  redis.call('DECRBY', P..':used', r.size)
  if used >= 0 then
    set_counter(r.rank, r.tenant,
                math.max(counter(r.rank, r.tenant) + (used - r.cost) / r.weight, 0))
  end
end
redis.call('HDEL', P..':t', id)
return grant(capacity, now, lease)
""")

# ARGV: prefix, channel, id -> 1: it left the line | 2: it holds a slot | 0: unknown
_CANCEL = Script(_LIB + """
local id = ARGV[3]
local r = rec(id)
if not r then return 0 end
if redis.call('ZSCORE', P..':inflight', id) then return 2 end
if redis.call('LREM', P..':line:'..r.rank..':'..r.tenant, 1, id) == 1 then
  unwait(r.rank, r.tenant)
end
redis.call('HDEL', P..':t', id)
return 1
""")

# ARGV: prefix, channel, capacity, lease, alive, the number of waiting ids, the waiting
# ids, the held ids: keeps the waiting ones alive and renews the held ones' leases,
# grants what fits -> {the waiting ids that hold a slot, the waiting ids Redis lost}
_POLL = Script(_LIB + """
local capacity, now = tonumber(ARGV[3]), clock()
local lease, alive, waiting = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
purge(now)
for i = 7 + waiting, #ARGV do
  redis.call('ZADD', P..':inflight', 'XX', now + lease, ARGV[i])
end
for i = 7, 6 + waiting do
  local r = rec(ARGV[i])
  if r and not redis.call('ZSCORE', P..':inflight', ARGV[i]) then
    r.alive = now + alive
    put(ARGV[i], r)
  end
end
grant(capacity, now, lease)
local holding, lost = {}, {}
for i = 7, 6 + waiting do
  if redis.call('ZSCORE', P..':inflight', ARGV[i]) then holding[#holding + 1] = ARGV[i]
  elseif redis.call('HEXISTS', P..':t', ARGV[i]) == 0 then lost[#lost + 1] = ARGV[i] end
end
return {holding, lost}
""")

# ARGV: prefix, channel -> {in flight, rank, tenant, waiting, rank, tenant, waiting...}
_SNAPSHOT = Script(_LIB + """
local out = {used()}
for rank = 0, 2 do
  for _, tenant in ipairs(redis.call('ZRANGE', P..':lines:'..rank, 0, -1)) do
    out[#out + 1] = rank
    out[#out + 1] = tenant
    out[#out + 1] = redis.call('LLEN', P..':line:'..rank..':'..tenant)
  end
end
return out
""")


class _Waiter:
    __slots__ = ("server", "event", "granted", "lost")

    def __init__(self, server: str) -> None:
        self.server = server
        self.event = threading.Event()
        self.granted = False
        self.lost = False  # Redis forgot it (a restart): it enters the line again


class RedisSlots:
    """The ``Slots`` interface, shared through Redis. ``local``: this process's share of
    every server, used while Redis cannot be reached."""

    def __init__(self, url: str, waits: Waits, local: Slots,
                 observer: QueueObserver | None = None) -> None:
        import redis

        self.waits = waits
        self._client = redis.Redis.from_url(url, socket_timeout=2.0,
                                            socket_connect_timeout=2.0)
        self._url = url
        self._local = local
        self._observer = observer
        self._pipe = Pipeline(self._client, (_ENTER, _RELEASE, _CANCEL, _POLL, _SNAPSHOT))
        self._waiters: dict[str, _Waiter] = {}  # ticket id -> this process's waiting one
        self._held: dict[str, tuple[str, int]] = {}  # ticket id -> (server, capacity)
        self._capacity: dict[str, int] = {}
        self._models: dict[str, str] = {}
        self._intervals: dict[str, tuple[float, float]] = {}  # server -> (last, smoothed)
        self._lock = threading.Lock()
        self._started = False
        self._renewed_at = time.monotonic()

    # ---- the Slots interface ---------------------------------------------------------

    def take(self, server: str, model: str, capacity: int, place: Place,
             client_gone: Callable[[], bool], retry: bool = False) -> Held:
        self._start()
        began = time.monotonic()
        rank = RANK.get(place.tier, RANK["default"])
        ticket = secrets.token_hex(8)
        waiter = _Waiter(server)
        with self._lock:
            self._waiters[ticket] = waiter  # before ENTER: a grant may come at once
            self._capacity[server] = capacity
            self._models[server] = model
        try:
            state = self._enter(server, capacity, place, ticket, retry)
            if state is None:  # Redis is down or slow: this process's share
                return self._local.take(server, model, capacity, place, client_gone, retry)
            if state == 0:
                self._wait(server, model, capacity, place, ticket, waiter,
                           began + self.waits.timeouts[rank], client_gone)
        finally:
            with self._lock:
                self._waiters.pop(ticket, None)
        with self._lock:
            self._held[ticket] = (server, capacity)
        held = Held(self, server, _RemoteTicket(ticket, place), time.monotonic() - began)
        if self._observer is not None and state == 0:
            self._observer.waited(model, place.tier, place.tenant, held.waited)
            self._observer.slots(server, 0, min(place.size, capacity))
        return held

    def _enter(self, server: str, capacity: int, place: Place, ticket: str,
               retry: bool) -> int | None:
        """Puts the ticket in the server's line: 1 (it holds a slot), 0 (it waits), None
        (Redis cannot be asked); a full line is a 429."""
        answer = self._pipe.ask(Call(_ENTER, [], [
            _prefix(server), CHANNEL, ticket, place.tenant, RANK.get(place.tier, 1),
            place.cost, place.weight, capacity, 0, LEASE, ALIVE, self.waits.max_waiting,
            self.waits.max_waiting_per_tenant, int(retry), MAX_LEAD, KEY_TTL, MAX_COST,
            place.size],
            threading.Event()), REDIS_WAIT)
        if answer is None or isinstance(answer, Exception):
            return None
        state, waiting = int(answer[0]), int(answer[1])
        if state < 0:
            reason = "queue_full" if state == -1 else "tenant_queue_full"
            self._refused(self._models.get(server, ""), place.tier, reason)
            raise self._local.full_error(reason, retry_after(
                self._drain_seconds(server, waiting)))
        return state

    def drain(self) -> None:
        """On a graceful stop: the releases still queued go to Redis."""
        self._pipe.drain()

    def release(self, held: Held, used: float | None) -> None:
        ticket = held.ticket
        if not isinstance(ticket, _RemoteTicket):
            self._local.release(held, used)
            return
        with self._lock:
            known = self._held.pop(ticket.id, None)
        if known is None:
            return
        server, capacity = known
        self._pipe.send(Call(_RELEASE, [], [
            _prefix(server), CHANNEL, ticket.id, -1 if used is None else used, capacity,
            0, LEASE], None))
        if self._observer is not None:
            self._observer.slots(server, 0, -min(ticket.place.size, capacity))

    def server_failed(self, server: str) -> None:
        self._local.server_failed(server)
        with self._lock:
            for waiter in self._waiters.values():
                if waiter.server == server:
                    waiter.event.set()  # it finds it was not granted, and leaves

    def snapshot(self) -> list[dict[str, Any]]:
        found = []
        for server, capacity in sorted(self._capacity.items()):
            answer = self._pipe.ask(Call(_SNAPSHOT, [], [_prefix(server), CHANNEL],
                                         threading.Event()), REDIS_WAIT)
            if answer is None or isinstance(answer, Exception):
                continue
            rows = list(answer[1:])
            found.append({"server": server, "model": self._models.get(server, ""),
                          "capacity": capacity, "in_flight": int(answer[0]),
                          "waiting": [{"tenant": _text(rows[i + 1]),
                                       "tier": TIERS[int(rows[i])],
                                       "requests": int(rows[i + 2])}
                                      for i in range(0, len(rows), 3)],
                          "shared": True})
        return found or self._local.snapshot()

    # ---- waiting ---------------------------------------------------------------------

    def _wait(self, server: str, model: str, capacity: int, place: Place, ticket: str,
              waiter: _Waiter, deadline: float, client_gone: Callable[[], bool]) -> None:
        observer = self._observer
        if observer is not None:
            observer.waiting(model, place.tier, 1)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if waiter.event.wait(min(TICK, max(remaining, 0.0))):
                    if waiter.granted:
                        return
                    waiter.event.clear()
                    if waiter.lost:  # Redis restarted: back in line, at its head
                        waiter.lost = False
                        if self._enter(server, capacity, place, ticket, True) != 0:
                            return  # granted at once (or Redis is gone: it goes on)
                        continue
                    # its server failed: leave the line
                    self._cancel(server, capacity, ticket, gone=True)
                    raise ServerLeft("The model server this request waited for failed.")
                gone = client_gone()
                if not gone and remaining > 0:
                    continue
                if self._cancel(server, capacity, ticket, gone) and not gone:
                    return  # granted meanwhile: used
                if gone:
                    raise ClientClosedRequest("The client closed the connection while the "
                                              "request waited for the model.")
                self._refused(model, place.tier, "timeout")
                raise self._local.timeout_error(RANK.get(place.tier, 1), retry_after(
                    self._drain_seconds(server, 0)))
        finally:
            if observer is not None:
                observer.waiting(model, place.tier, -1)

    def _cancel(self, server: str, capacity: int, ticket: str, gone: bool) -> bool:
        """Leaves the line; True if the request held a slot by then (and, ``gone``, gave
        it back)."""
        answer = self._pipe.ask(Call(_CANCEL, [], [_prefix(server), CHANNEL, ticket],
                                     threading.Event()), REDIS_WAIT)
        if answer == 2:
            if gone:
                self._pipe.send(Call(_RELEASE, [], [_prefix(server), CHANNEL, ticket, -1,
                                                    capacity, 0, LEASE], None))
                return True
            return True
        return False

    def _drain_seconds(self, server: str, ahead: int) -> float:
        """How long ``ahead`` requests take, from how often this server's slots have been
        handed on (as every process hears it)."""
        interval = self._intervals.get(server, (0.0, 0.0))[1] or 1.0
        return (ahead + 1) * interval

    # ---- the process's threads: grants heard, lines polled, leases renewed -----------

    def _start(self) -> None:
        if self._started:
            return
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._listen, name="queue-grants", daemon=True).start()
        threading.Thread(target=self._poll, name="queue-poll", daemon=True).start()

    def _listen(self) -> None:
        import redis

        lost = False
        while True:
            try:
                client = redis.Redis.from_url(self._url, socket_connect_timeout=2.0)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                if lost:
                    log.info("listening to the queue's Redis channel again")
                    lost = False
                for message in pubsub.listen():  # type: ignore[no-untyped-call]
                    if message.get("type") == "message":
                        self._heard(_text(message["data"]))
            except Exception as exc:  # redis' errors: the polls cover the gap
                if not lost:  # once, not every second while Redis is away
                    log.warning("lost the queue's Redis channel (%s); listening again "
                                "when it is back", exc)
                    lost = True
                time.sleep(1.0)

    def _heard(self, message: str) -> None:
        prefix, _, ids = message.partition("\t")
        server = prefix[len("fc:q:{"):-1]
        granted = ids.split(",") if ids else []
        now = time.monotonic()
        last, smoothed = self._intervals.get(server, (0.0, 0.0))
        if last and granted:
            gap = min(now - last, 60.0) / len(granted)
            smoothed = gap if not smoothed else smoothed + (gap - smoothed) * 0.2
        self._intervals[server] = (now, smoothed)
        self._granted(granted)

    def _granted(self, ids: list[str]) -> None:
        with self._lock:
            for ticket in ids:
                waiter = self._waiters.get(ticket)
                if waiter is not None:
                    waiter.granted = True
                    waiter.event.set()

    def _lost(self, ids: list[str]) -> None:
        with self._lock:
            for ticket in ids:
                waiter = self._waiters.get(ticket)
                if waiter is not None and not waiter.granted:
                    waiter.lost = True
                    waiter.event.set()

    def _poll(self) -> None:
        while True:
            time.sleep(POLL)
            try:
                self._poll_once()
            except Exception:  # never let it die: the waiting requests count on it
                log.exception("polling the queues' Redis failed")

    def _poll_once(self) -> None:
        renew = time.monotonic() - self._renewed_at >= LEASE / 3
        if renew:
            self._renewed_at = time.monotonic()
        with self._lock:
            waiting: dict[str, list[str]] = {}
            held: dict[str, list[str]] = {}
            for ticket, waiter in self._waiters.items():
                waiting.setdefault(waiter.server, []).append(ticket)
            if renew:
                for ticket, (server, _) in self._held.items():
                    held.setdefault(server, []).append(ticket)
        for server in set(waiting) | set(held):
            mine = waiting.get(server, [])
            answer = self._pipe.ask(Call(_POLL, [], [
                _prefix(server), CHANNEL, self._capacity.get(server, 1), LEASE, ALIVE,
                len(mine), *mine, *held.get(server, [])], threading.Event()), REDIS_WAIT)
            if isinstance(answer, list) and len(answer) == 2:
                self._granted([_text(ticket) for ticket in answer[0]])
                self._lost([_text(ticket) for ticket in answer[1]])

    def _refused(self, model: str, tier: str, reason: str) -> None:
        if self._observer is not None:
            self._observer.refused(model, tier, reason)


class _RemoteTicket:
    """What a Held slot from Redis carries: its ticket id."""

    __slots__ = ("id", "place")

    def __init__(self, ticket: str, place: Place) -> None:
        self.id = ticket
        self.place = place


def _prefix(server: str) -> str:
    return "fc:q:{" + server + "}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

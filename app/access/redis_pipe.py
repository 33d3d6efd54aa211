"""The one connection to Redis a gateway process uses for its limits: script calls queue up
and go out together, one pipelined round trip at a time (while one is on the wire, the
calls that arrive wait for the next; no timer: a lone call goes out at once). Scripts run
by their SHA (loaded once, and again if Redis forgets them), so a batch is one round trip.

Calls nobody waits for are either retried until Redis takes them (settlements: what a
request gave back or spent is not lost to a blip; at most ``MAX_RETRIES`` wait, beyond
that the oldest are dropped and logged) or dropped (lease renewals, made again anyway).
``periodic`` calls go out every ``every`` seconds, however busy the queue is.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

REDIS_RETRY_DOWN = 1.0  # seconds between tries while Redis is unreachable
MAX_RETRIES = 100_000  # settlements kept for Redis while it is unreachable
DRAIN_SECONDS = 5.0  # how long a graceful stop waits for the calls still queued
log = logging.getLogger("flaskchat.limits")


@dataclass(frozen=True)
class Script:
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


@dataclass
class Call:
    """One script call on its way to Redis; ``done`` is set when its answer is in (None:
    nobody waits, and it is retried until Redis takes it, if ``retried``)."""

    script: Script
    keys: list[str]
    args: list[Any]
    done: threading.Event | None
    retried: bool = True
    result: Any = None


class Pipeline:
    def __init__(self, client: Any, scripts: tuple[Script, ...],
                 periodic: Callable[[], list[Call]] | None = None,
                 every: float = 300.0) -> None:
        """``scripts``: every script its calls run, loaded together before the first
        batch (so that a batch's calls run in order) and again if Redis forgets them."""
        self._client = client
        self._scripts = scripts
        self._loaded = False
        self._periodic = periodic
        self._every = every
        self._queue: list[Call] = []
        self._retries: list[Call] = []
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._sender: threading.Thread | None = None
        self._failing_since: float | None = None
        self._tried_at = 0.0
        self._periodic_at = time.monotonic()

    def send(self, call: Call) -> None:
        with self._lock:
            self._queue.append(call)
            start = self._sender is None
            if start:
                self._sender = threading.Thread(target=self._run, name="redis-limits",
                                                daemon=True)
        if start:
            assert self._sender is not None
            self._sender.start()
        self._wakeup.set()

    def ask(self, call: Call, timeout: float) -> Any:
        """Sends ``call`` and waits up to ``timeout`` for its answer: the answer, an
        exception (Redis failed), or None (too slow: it may still run later)."""
        assert call.done is not None
        self.send(call)
        return call.result if call.done.wait(timeout) else None

    def drain(self, timeout: float = DRAIN_SECONDS) -> bool:
        """On a graceful stop: waits (up to ``timeout``) until what is queued or waiting
        to be retried is in Redis."""
        deadline = time.monotonic() + timeout
        while self._queue or self._retries:
            if time.monotonic() > deadline:
                log.error("stopping with %d calls of the limits not sent to Redis",
                          len(self._queue) + len(self._retries))
                return False
            self._wakeup.set()
            time.sleep(0.05)
        return True

    def _run(self) -> None:
        while True:
            self._wakeup.wait(self._next_wait())
            self._wakeup.clear()
            while True:
                self._take_due()
                with self._lock:
                    batch, self._queue = self._queue, []
                if not batch:
                    break
                try:
                    self._round_trip(batch)
                except Exception:  # never let the sender die: every limit waits on it
                    log.exception("Redis round trip failed")

    def _take_due(self) -> None:
        """Renewals when due, and the retries once Redis may be back."""
        if self._periodic is not None and \
                time.monotonic() - self._periodic_at >= self._every:
            self._periodic_at = time.monotonic()
            renewals = self._periodic()
            with self._lock:
                self._queue.extend(renewals)
        if self._retries and not self._down():
            with self._lock:
                self._queue[:0], self._retries = self._retries, []

    def _next_wait(self) -> float:
        wait = self._every - (time.monotonic() - self._periodic_at) \
            if self._periodic is not None else 3600.0
        if self._retries:
            wait = min(wait, REDIS_RETRY_DOWN)
        return max(wait, 0.05)

    def _down(self) -> bool:
        return self._failing_since is not None and \
            time.monotonic() - self._tried_at < REDIS_RETRY_DOWN

    def _round_trip(self, batch: list[Call]) -> None:
        results: list[Any]
        if self._down():
            # Down a moment ago: no connect timeout for every request while it stays down.
            results = [ConnectionError("Redis is unreachable")] * len(batch)
        else:
            self._tried_at = time.monotonic()
            results = self._execute(batch)
            unreachable = next((r for r in results if _unreachable(r)), None)
            if unreachable is not None:
                self._failed(unreachable)
            else:
                self._recovered()
        for call, result in zip(batch, results):
            if call.done is not None:
                call.result = result
                call.done.set()
            elif _transient(result):
                if call.retried:
                    self._retry(call)
            elif isinstance(result, Exception):
                log.error("Redis refused a call of the limits: %s", result)

    def _execute(self, batch: list[Call]) -> list[Any]:
        if not self._loaded:
            error = self._load()
            if error is not None:
                return [error] * len(batch)
        results = self._pipeline(batch)
        missing = [i for i, r in enumerate(results) if type(r).__name__ == "NoScriptError"]
        if missing:  # Redis restarted, or its scripts were flushed: load them, once
            error = self._load()
            if error is not None:
                return [error] * len(batch)
            for i, result in zip(missing, self._pipeline([batch[i] for i in missing])):
                results[i] = result
        return results

    def _load(self) -> Exception | None:
        try:
            for script in self._scripts:
                self._client.script_load(script.source)
        except Exception as exc:  # redis' errors, whatever their kind
            return exc
        self._loaded = True
        return None

    def _pipeline(self, batch: list[Call]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for call in batch:
            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        try:
            return list(pipe.execute(raise_on_error=False))
        except Exception as exc:  # redis' errors, whatever their kind
            return [exc] * len(batch)

    def _retry(self, call: Call) -> None:
        """Keeps a call nobody waits for until Redis can take it again."""
        self._retries.append(call)
        if len(self._retries) > MAX_RETRIES:
            dropped = len(self._retries) - MAX_RETRIES
            del self._retries[:dropped]
            log.error("Redis has been unreachable too long: dropped %d settlements of its "
                      "limits", dropped)

    def _failed(self, exc: Any) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.error("Redis is unreachable; rate limits are not enforced and budgets are "
                      "kept by each process alone until it is back: %s", exc)

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.warning("Redis is back after %.1f s; rate limits are enforced again",
                        time.monotonic() - self._failing_since)
            self._failing_since = None


_UNREACHABLE = ("ConnectionError", "TimeoutError", "BusyLoadingError")
# Redis answered but cannot take writes just now (a failover, memory, a busy script).
_REFUSED_FOR_NOW = ("READONLY", "OOM", "LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN")


def _unreachable(result: Any) -> bool:
    """Whether ``result`` is Redis failing to answer at all."""
    return isinstance(result, (ConnectionError, TimeoutError)) or \
        (isinstance(result, Exception) and type(result).__name__ in _UNREACHABLE)


def _transient(result: Any) -> bool:
    """Whether a call that failed so may succeed if sent again."""
    return _unreachable(result) or (isinstance(result, Exception)
                                    and str(result).startswith(_REFUSED_FOR_NOW))

"""The one connection to Redis a gateway process uses for its limits: script calls queue up
and go out together, one pipelined round trip at a time (while one is on the wire, the
calls that arrive wait for the next; no timer: a lone call goes out at once). Under load
a request costs a small part of a round trip instead of whole ones.

Calls nobody waits for (settlements) are retried until Redis takes them, so what a
request gave back or spent is not lost to a blip (at most ``MAX_RETRIES`` wait; beyond,
the oldest are dropped and that is logged). A call whose caller stopped waiting (Redis was
slow) hands its late answer to ``on_late``, which undoes what it reserved. ``periodic``
calls (lease renewals) go out every ``every`` seconds.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

REDIS_RETRY_DOWN = 1.0  # seconds between tries while Redis is unreachable
MAX_RETRIES = 100_000  # settlements kept for Redis while it is unreachable
log = logging.getLogger("flaskchat.limits")


@dataclass
class Call:
    """One script call on its way to Redis; ``done`` is set when its answer is in (None:
    nobody waits, and it is retried until Redis takes it)."""

    script: Any
    keys: list[str]
    args: list[Any]
    done: threading.Event | None
    result: Any = None
    abandoned: bool = False  # its caller gave up waiting
    on_late: Callable[[Any], None] | None = None  # hears the answer of an abandoned call


class Pipeline:
    def __init__(self, client: Any, periodic: Callable[[], list[Call]] | None = None,
                 every: float = 300.0) -> None:
        self._client = client
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
        self._queue.append(call)
        if self._sender is None or not self._sender.is_alive():
            self._sender = threading.Thread(target=self._run, name="redis-limits",
                                            daemon=True)
            self._sender.start()
        self._wakeup.set()

    def ask(self, call: Call, timeout: float) -> Any:
        """Sends ``call`` and waits up to ``timeout`` for its answer: the answer, an
        exception (Redis failed), or None (too slow: the call is abandoned, and its late
        answer goes to its ``on_late``)."""
        assert call.done is not None
        self.send(call)
        if call.done.wait(timeout):
            return call.result
        with self._lock:
            if not call.done.is_set():
                call.abandoned = True
                return None
        return call.result

    def _run(self) -> None:
        while True:
            self._wakeup.wait(self._next_wait())
            self._wakeup.clear()
            if self._periodic is not None and \
                    time.monotonic() - self._periodic_at >= self._every:
                self._periodic_at = time.monotonic()
                self._queue.extend(self._periodic())
            if self._retries and not self._down():
                self._queue[:0], self._retries = self._retries, []
            while self._queue:
                batch, self._queue = self._queue, []
                self._round_trip(batch)

    def _next_wait(self) -> float:
        wait = self._every - (time.monotonic() - self._periodic_at)
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
            pipe = self._client.pipeline(transaction=False)
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
            if call.done is None:
                if _unreachable(result):
                    self._retry(call)
                elif isinstance(result, Exception):
                    log.error("Redis refused a settlement of its limits: %s", result)
                continue
            with self._lock:
                call.result = result
                call.done.set()
                late = call.abandoned
            if late and call.on_late is not None and not isinstance(result, Exception):
                call.on_late(result)

    def _retry(self, call: Call) -> None:
        """Keeps a call nobody waits for until Redis can be reached again."""
        self._retries.append(call)
        if len(self._retries) > MAX_RETRIES:
            dropped = len(self._retries) - MAX_RETRIES
            del self._retries[:dropped]
            log.error("Redis has been unreachable too long: dropped %d settlements of its "
                      "limits", dropped)

    def _failed(self, exc: Exception) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.error("Redis is unreachable; rate limits are not enforced and budgets are "
                      "kept by each process alone until it is back: %s", exc)

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.warning("Redis is back after %.1f s; rate limits are enforced again",
                        time.monotonic() - self._failing_since)
            self._failing_since = None


def _unreachable(result: Any) -> bool:
    """Whether ``result`` is Redis failing to answer (not refusing the call)."""
    return isinstance(result, (ConnectionError, TimeoutError)) or \
        type(result).__name__ in ("ConnectionError", "TimeoutError", "BusyLoadingError")

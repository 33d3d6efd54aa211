"""Failover: a server that fails before answering is marked and skipped, and the request
goes once to another server of the model, unseen by the client. The same for FastChat
workers (through the controller's list) and OpenAI-compatible upstreams."""
from __future__ import annotations

import logging
from time import perf_counter
from typing import Callable, Iterable, Protocol, TypeVar

from app.errors import APIError, ConnectTimedOut, WorkerUnreachable
from app.scheduling.slots import ServerLeft
from app.telemetry import tracing

T = TypeVar("T")
K = TypeVar("K")
K_in = TypeVar("K_in", contravariant=True)
log = logging.getLogger("flaskchat.failover")

ATTEMPTS = 2  # a server that fails before answering is skipped, once


class Router(Protocol[K]):
    """Where a model's requests can go: FastChat workers (by address, through the
    controller) or OpenAI-compatible upstreams."""

    def acquire(self, model: str, exclude: Iterable[K] = ...) -> K: ...
    def release(self, key: K) -> None: ...
    def mark_failed(self, key: K, unreachable: bool = ...) -> None: ...


class Queue(Protocol[K_in]):
    """A request's line for a server's slots (``app.serving.queueing``): ``wait`` returns
    once it holds a slot on the server ``key`` names (at once where the server's capacity
    is not known); ``leave`` gives back the slot of an attempt that failed; ``down``: the
    server cannot be reached, so whoever waits for it goes elsewhere."""

    def wait(self, key: K_in, retry: bool) -> None: ...
    def leave(self) -> None: ...
    def down(self, key: K_in) -> None: ...


class FailureLog(Protocol):
    """Hears of upstream failures (the gateway's metrics count them)."""

    def failed(self, error: APIError) -> None: ...
    def retried(self, model: str) -> None: ...


class NoLog:
    def failed(self, error: APIError) -> None:
        pass

    def retried(self, model: str) -> None:
        pass


def with_failover(router: Router[K], model: str, attempt: Callable[[K], T],
                  failures: FailureLog, forget: Callable[[K], None] | None = None,
                  queue: Queue[K] | None = None,
                  trace: tracing.Trace | None = None) -> tuple[K, T]:
    """Runs ``attempt(key)`` on a server for ``model``, once ``queue`` (if any) gives it a
    slot there. A server that refuses the connection, says nothing in time, or answers
    with a server error is marked unhealthy, and the attempt goes once to another server
    of the model (at the head of its tenant's line there). The returned key is still
    acquired: release it (and the slot, which the request's end gives back)."""
    tried: list[K] = []
    failure: APIError | None = None
    while True:
        try:
            key = router.acquire(model, exclude=tried)
        except APIError:
            if failure is not None:
                raise failure from None  # no other server: the first failure is the answer
            raise
        try:
            if queue is not None:
                queue.wait(key, bool(tried))
            if trace is None or not trace.sampled:  # (its traceparent goes out all the same)
                return key, attempt(key)
            return key, _traced_attempt(trace, key, attempt, len(tried) + 1)
        except APIError as exc:
            router.release(key)
            if queue is not None:
                queue.leave()
            if isinstance(exc, ServerLeft):  # marked failed by another request already
                tried.append(key)
                failure = failure or exc
                if len(tried) >= ATTEMPTS:
                    raise failure from None
                continue
            if not exc.failover:
                raise
            # Refusing or not taking the connection means down; a slow or failed answer
            # may be this request's trouble, so such a server is only avoided.
            unreachable = isinstance(exc, (WorkerUnreachable, ConnectTimedOut))
            router.mark_failed(key, unreachable=unreachable)
            if unreachable and queue is not None:
                queue.down(key)
            if forget is not None:
                forget(key)
            tried.append(key)
            log.warning("%s failed for %s: %s", key, model, exc.message)
            failures.failed(exc)
            if len(tried) >= ATTEMPTS:
                raise
            failure = exc
            failures.retried(model)
        except BaseException:
            router.release(key)
            if queue is not None:
                queue.leave()
            raise


def _traced_attempt(trace: tracing.Trace, key: K, attempt: Callable[[K], T],
                    number: int) -> T:
    """``attempt(key)`` in its own client span; its time is the time to first byte (a
    stream's head, or a whole non-stream answer). A failure marks the span."""
    with trace.child("upstream attempt", {"server.address": tracing.address(key),
                                          "flaskchat.attempt": number}, client=True) as span:
        started = perf_counter()
        result = attempt(key)
        span.set_attribute("flaskchat.ttfb_ms", round((perf_counter() - started) * 1000, 2))
    return result


def releaser(router: Router[K], key: K) -> Callable[[], None]:
    """``router.release(key)`` that runs once, however often it is called (a stream's
    close callbacks may overlap)."""
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            router.release(key)
    return release

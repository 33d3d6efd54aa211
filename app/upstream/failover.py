"""Failover: a server that fails before answering is marked and skipped, and the request
goes once to another server of the model, unseen by the client. The same for FastChat
workers (through the controller's list) and OpenAI-compatible upstreams."""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Protocol, TypeVar

from app.errors import APIError, ConnectTimedOut, WorkerUnreachable

T = TypeVar("T")
K = TypeVar("K")
log = logging.getLogger("flaskchat.failover")

ATTEMPTS = 2  # a server that fails before answering is skipped, once


class Router(Protocol[K]):
    """Where a model's requests can go: FastChat workers (by address, through the
    controller) or OpenAI-compatible upstreams."""

    def acquire(self, model: str, exclude: Iterable[K] = ...) -> K: ...
    def release(self, key: K) -> None: ...
    def mark_failed(self, key: K, unreachable: bool = ...) -> None: ...


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
                  failures: FailureLog, forget: Callable[[K], None] | None = None
                  ) -> tuple[K, T]:
    """Runs ``attempt(key)`` on a server for ``model``. A server that refuses the
    connection, says nothing in time, or answers with a server error is marked unhealthy,
    and the attempt goes once to another server of the model. The returned key is still
    acquired: release it."""
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
            return key, attempt(key)
        except APIError as exc:
            router.release(key)
            if not exc.failover:
                raise
            # Refusing or not taking the connection means down; a slow or failed answer
            # may be this request's trouble, so such a server is only avoided.
            router.mark_failed(
                key, unreachable=isinstance(exc, (WorkerUnreachable, ConnectTimedOut)))
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
            raise


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

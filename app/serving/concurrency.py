"""Runs a request's independent upstream calls at the same time.

Threads here are greenlets under gunicorn's gevent worker (it patches threading before
the app loads), so this costs no OS threads in production.
"""
from __future__ import annotations

import contextvars
import threading
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")

MAX_PARALLEL_CALLS = 32  # per request; workers queue the rest anyway


def run_all(calls: Sequence[Callable[[], T]], limit: int = MAX_PARALLEL_CALLS) -> list[T]:
    """Results in order; the first exception (by position) is raised after all finish."""
    if len(calls) == 1:
        return [calls[0]()]
    results: list[T | None] = [None] * len(calls)
    failures: list[BaseException | None] = [None] * len(calls)
    slots = threading.BoundedSemaphore(limit)

    def run(index: int) -> None:
        try:
            results[index] = calls[index]()
        except BaseException as exc:  # re-raised in the caller below
            failures[index] = exc
        finally:
            slots.release()

    threads = []
    for index in range(len(calls)):
        slots.acquire()
        # each in a copy of the request's context (its request id, its trace)
        thread = threading.Thread(target=contextvars.copy_context().run, args=(run, index),
                                  daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    for failure in failures:
        if failure is not None:
            raise failure
    return results  # type: ignore[return-value]

"""The worker's concurrency limit: a semaphore whose every acquire is paired with a release
(a context manager), plus the counts that make up FastChat's queue_length."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

WAIT_STEP = 0.25  # how often a queued request checks whether its client has gone


class Cancelled(Exception):
    """The client went away while the request was waiting for a slot."""


class Slots:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._semaphore = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self.running = 0
        self.waiting = 0

    @property
    def queue_length(self) -> int:
        return self.running + self.waiting

    @contextmanager
    def slot(self, cancel: threading.Event | None = None) -> Iterator[None]:
        with self._lock:
            self.waiting += 1
        try:
            while not self._semaphore.acquire(timeout=WAIT_STEP):
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
        finally:
            with self._lock:
                self.waiting -= 1
        with self._lock:
            self.running += 1
        try:
            yield
        finally:
            with self._lock:
                self.running -= 1
            self._semaphore.release()

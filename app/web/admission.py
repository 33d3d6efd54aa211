"""Admission control per process: at most ``max_in_flight`` model requests are worked on at
once; up to ``max_queued`` more wait up to ``queue_timeout`` seconds for a place; the rest
get 429 with Retry-After at once. A place is held until the response is closed, streams
included, and released on every path."""
from __future__ import annotations

import threading
import time
from typing import Callable

from flask import Flask, Response, current_app, g

from app.errors import Overloaded

EXTENSION = "flaskchat.admission"
RETRY_AFTER = "1"


class Admission:
    def __init__(self, max_in_flight: int, max_queued: int, timeout: float,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self._places = threading.BoundedSemaphore(max_in_flight)
        self._on_refused = on_refused  # hears "overloaded" for each 429
        self._max_queued = max(max_queued, 0)
        self._timeout = timeout
        self.in_flight = 0
        self.queued = 0

    def enter(self) -> Callable[[], None]:
        """Takes a place (perhaps after a wait) and returns the function that gives it back."""
        if not self._places.acquire(blocking=False):
            if self.queued >= self._max_queued:
                self._refused()
                raise Overloaded("The server is at capacity; retry shortly.",
                                 headers={"Retry-After": RETRY_AFTER})
            self.queued += 1
            try:
                admitted = self._places.acquire(timeout=self._timeout)
            finally:
                self.queued -= 1
            if not admitted:
                self._refused()
                raise Overloaded("The server stayed at capacity while this request waited; "
                                 "retry shortly.", headers={"Retry-After": RETRY_AFTER})
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
                self._places.release()
        return release

    def _refused(self) -> None:
        if self._on_refused is not None:
            self._on_refused("overloaded")


def init_app(app: Flask, max_in_flight: int, max_queued: int, timeout: float,
             on_refused: Callable[[str], None] | None = None) -> None:
    app.extensions[EXTENSION] = Admission(max_in_flight, max_queued, timeout, on_refused)
    app.after_request(_hand_over)
    app.teardown_request(_release_unless_handed_over)


def admission() -> Admission:
    found: Admission = current_app.extensions[EXTENSION]
    return found


def admit() -> None:
    """A before_request hook for the model blueprints (after the key check)."""
    call = g.get("call")
    if call is None or call.trace is None:
        g.admission_release = admission().enter()
        return
    started = time.time()
    try:
        g.admission_release = admission().enter()
    finally:
        if time.time() - started > 0.0005:  # only a real wait is worth a span
            call.trace.record("admission wait", started, time.time())


def _hand_over(response: Response) -> Response:
    release = g.pop("admission_release", None)
    if release is not None:
        response.call_on_close(release)  # a stream keeps its place until it ends
    return response


def _release_unless_handed_over(error: BaseException | None) -> None:
    release = g.pop("admission_release", None)
    if release is not None:
        release()

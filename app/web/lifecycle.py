"""Whether this process is stopping: the gunicorn worker says so the moment a stop or a
reload begins, and /ready answers 503 ("draining") from then on, so that a load balancer
sends new traffic elsewhere while the process finishes what it has."""
from __future__ import annotations

import logging
import time
from typing import Callable

from flask import Flask, current_app

log = logging.getLogger("flaskchat")

EXTENSION = "flaskchat.lifecycle"


class Lifecycle:
    """``drain_seconds``: how long a stopping process keeps accepting and lets idle
    keep-alive connections bring one more request (the gunicorn worker reads it)."""

    def __init__(self, drain_seconds: float) -> None:
        self.drain_seconds = drain_seconds
        self.draining_since: float | None = None  # time.monotonic() when the stop began
        self._on_stop: list[Callable[[], object]] = []

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    def begin_drain(self) -> None:
        if self.draining_since is None:
            self.draining_since = time.monotonic()

    def on_stop(self, callback: Callable[[], object]) -> None:
        """``callback`` runs when the process stops gracefully, after its last request
        (the usage ledger writes what is left)."""
        self._on_stop.append(callback)

    def stopped(self) -> None:
        for callback in self._on_stop:
            try:
                callback()
            except Exception:  # one failing must not keep the others from running
                log.exception("while stopping")


def init_app(app: Flask, drain_seconds: float) -> None:
    app.extensions[EXTENSION] = Lifecycle(drain_seconds)


def lifecycle() -> Lifecycle:
    return lifecycle_of(current_app)


def lifecycle_of(app: Flask) -> Lifecycle:
    found: Lifecycle = app.extensions[EXTENSION]
    return found


def of(wsgi_app: object) -> Lifecycle | None:
    """The lifecycle of a WSGI app, if it is one of ours (for the gunicorn worker)."""
    extensions = getattr(wsgi_app, "extensions", None)
    found = extensions.get(EXTENSION) if isinstance(extensions, dict) else None
    return found if isinstance(found, Lifecycle) else None

"""gunicorn's gevent worker, with a graceful stop that does not wait for idle clients.

On SIGTERM (a deploy, systemd stop) gunicorn's worker stops accepting, lets running
requests and streams finish (up to graceful_timeout), and then exits. But a keep-alive
connection waiting for its next request also counts as running, so every client with a
pooled connection (the openai client, nginx's upstream keepalive) held a worker for up to
the keep-alive timeout after its last request. This worker closes such idle connections
at once; requests in progress, streams included, are untouched.

Loaded by gunicorn's arbiter by name (``app.runtime.gevent_worker.GeventWorker``); imports gevent
but nothing that must be imported after monkey-patching.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import gevent
from gunicorn.workers.ggevent import GeventWorker as _GunicornGeventWorker

IDLE_WAIT_WHILE_STOPPING = 0.001  # seconds: a request already on the wire is still read


class GeventWorker(_GunicornGeventWorker):  # type: ignore[misc]
    def init_process(self) -> None:
        self._idle: dict[Any, gevent.Timeout] = {}  # greenlet -> its keep-alive wait
        super().init_process()

    @contextmanager
    def timeout_ctx(self) -> Iterator[None]:
        """The wait for a connection's next request (gunicorn: keepalive seconds, then the
        connection closes), registered so that a stop can end it early."""
        seconds = self.cfg.keepalive if self.alive else IDLE_WAIT_WHILE_STOPPING
        timeout = gevent.Timeout(seconds, False)  # False: expiry just ends the wait
        current = gevent.getcurrent()
        self._idle[current] = timeout
        try:
            with timeout:
                yield
        finally:
            self._idle.pop(current, None)

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        idle: dict[Any, gevent.Timeout] = getattr(self, "_idle", {})  # {} while booting
        for greenlet, timeout in list(idle.items()):
            gevent.kill(greenlet, timeout)  # as if the keep-alive wait expired

"""The span processor of app.telemetry.tracing: finished spans wait in a bounded queue
and one background thread exports them in batches (a greenlet under gevent: the
exporter's socket writes yield to requests). Spans that do not fit, or whose export
fails, are dropped and counted; nothing here ever makes a request wait for the collector.

Not the SDK's BatchSpanProcessor: it cannot tell how many spans it dropped, and logs a
line for each one.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Callable

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger("flaskchat.tracing")

MAX_QUEUE = 4096  # finished spans waiting for export, at most; more are dropped
MAX_BATCH = 256  # spans per export call: bounds the time one encode holds the hub
SHUTDOWN_SECONDS = 5.0  # flushing what is left at exit, at most


class BoundedExport(SpanProcessor):
    """A span processor: finished spans into a bounded queue, exported in batches by one
    background thread; spans that do not fit, or whose export fails, are dropped and
    counted. Nothing here ever waits for the collector on a request's path."""

    def __init__(self, exporter: SpanExporter, dropped: Callable[[int], None],
                 max_queue: int = MAX_QUEUE, max_batch: int = MAX_BATCH,
                 delay: float = 1.0) -> None:
        self._exporter = exporter
        self._on_dropped = dropped
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._delay = delay
        self._queue: deque[ReadableSpan] = deque()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._pid = 0
        self.dropped = 0
        self._warned = 0.0

    def on_end(self, span: ReadableSpan) -> None:
        if self._stopped or not span.context.trace_flags.sampled:
            return
        if self._pid != os.getpid():  # the first span of this process (or of a fork)
            self._start_thread()
        if len(self._queue) >= self._max_queue:
            self._drop(1)
            return
        self._queue.append(span)
        if len(self._queue) >= self._max_batch:
            self._wake.set()

    def _start_thread(self) -> None:
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="span-export", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self._delay)
            self._wake.clear()
            self._export_all()

    def _export_all(self) -> None:
        with self._export_lock:
            while self._queue:
                batch = [self._queue.popleft()
                         for _ in range(min(len(self._queue), self._max_batch))]
                try:
                    result = self._exporter.export(batch)
                except Exception:  # noqa: BLE001 - a collector's trouble is never ours
                    result = None
                if result is not SpanExportResult.SUCCESS:
                    self._drop(len(batch))

    def _drop(self, count: int) -> None:
        self.dropped += count
        self._on_dropped(count)
        now = time.monotonic()
        if now - self._warned >= 60:
            self._warned = now
            log.warning("dropped %d trace spans so far: the collector is slow or down, "
                        "or the export queue (%d) is full", self.dropped, self._max_queue)

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._wake.set()
        deadline = time.monotonic() + SHUTDOWN_SECONDS  # for all of it, however it goes
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(SHUTDOWN_SECONDS)
        finisher = threading.Thread(target=self._export_all, daemon=True)
        finisher.start()
        finisher.join(max(0.0, deadline - time.monotonic()))
        try:
            self._exporter.shutdown()
        except Exception:  # noqa: BLE001
            pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._export_all()
        return True

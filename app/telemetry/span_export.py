"""Getting finished spans (app.telemetry.tracing) out of the process that serves requests.

Ended spans wait in a bounded queue, and become plain tuples when sent. One background
thread (a greenlet under gevent) sends them in batches, ``marshal``-ed, over a local
SOCK_SEQPACKET socket to a helper process (app.telemetry.export_process) which encodes
them with OpenTelemetry's SDK and exports them to the collector. Encoding a span costs
~40 us of Python; in the helper it is off the CPU time of the process that serves the
requests.

Nothing here ever waits: a full queue, or a socket the helper has not emptied, drops the
spans and counts them, and so does the helper when an export fails (it reports its count
back over the same socket). A helper that dies is started again, at most once every
RESTART_SECONDS.
"""
from __future__ import annotations

import importlib.util
import logging
import marshal
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Protocol

log = logging.getLogger("flaskchat.tracing")

MAX_QUEUE = 4096  # ended spans waiting to be sent, at most; more are dropped
MAX_BATCH = 512  # spans per export, at most (the SDK's default)
MESSAGE_SPANS = 256  # spans per message to the helper (~35 KB), which joins them up
MAX_MESSAGE = 60 * 1024  # bytes per message: within a socket's default send buffer
DEFAULT_DELAY = 1.0  # seconds between sends (OTEL_BSP_SCHEDULE_DELAY, in ms)
SHUTDOWN_SECONDS = 5.0  # sending what is left at exit, and the helper's export of it
RESTART_SECONDS = 10.0  # before a dead helper is started again; doubled while it keeps
MAX_RESTART_SECONDS = 300.0  # dying within a minute of its start, up to this
COUNT = struct.Struct("<I")  # a message's span count (a drop report is only that)
_ROOT = str(Path(__file__).resolve().parents[2])  # where the app package is


class Ended(Protocol):
    """An ended span (app.telemetry.tracing.Span): its record is made when it is sent."""

    def record(self) -> tuple[Any, ...]: ...


def missing_exporter() -> str | None:
    """What is missing for the helper to export, if anything (said at start-up, not at
    the first span)."""
    if importlib.util.find_spec("opentelemetry") is None or \
            importlib.util.find_spec("opentelemetry.sdk") is None:
        return "the OpenTelemetry SDK is not installed"
    if protocol() == "grpc":
        if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is None:
            return ("OTLP over gRPC needs `pip install opentelemetry-exporter-otlp-proto-"
                    "grpc` (or OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf)")
    elif importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None:
        return "opentelemetry-exporter-otlp-proto-http is not installed"
    return None


def protocol() -> str:
    return (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or
            os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()


class SpanShipper:
    """The bounded queue of ended spans and the thread that sends them to the helper
    process (started with ``start()`` or at the first span; again after a fork, or after
    the helper's death)."""

    def __init__(self, url: str, service: str, role: str, dropped: Callable[[int], None],
                 max_queue: int | None = None, max_batch: int | None = None,
                 delay: float | None = None) -> None:
        self._on_dropped = dropped
        self._max_queue = max_queue or _env_int("OTEL_BSP_MAX_QUEUE_SIZE", MAX_QUEUE)
        self._max_batch = max_batch or _env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", MAX_BATCH)
        self._helper_args = [url, service, role, str(self._max_batch)]
        self._delay = delay or _delay()
        self._queue: deque[Ended] = deque()
        self._wake = threading.Event()
        self._send_lock = threading.Lock()
        self._stopped = False
        self._started = False  # the sending thread, in this process
        self._helper: subprocess.Popen[bytes] | None = None
        self._socket: socket.socket | None = None
        self._started_helper = 0.0
        self._next_start = 0.0  # time.monotonic() before which no helper is started
        self._restart_after = RESTART_SECONDS / 2
        self.dropped = 0
        self._warned = -60.0
        os.register_at_fork(after_in_child=self._forked)

    def add(self, span: Ended) -> None:
        """Queues an ended span (never waits)."""
        if self._stopped:
            return
        if not self._started:  # the first span of this process (or of a fork)
            self._start_thread()
        if len(self._queue) >= self._max_queue:
            self._drop(1)
            return
        self._queue.append(span)
        if len(self._queue) == MESSAGE_SPANS:
            self._wake.set()

    def start(self) -> None:
        """Starts the sending thread and the helper now, not at the first span."""
        if not self._started:
            self._start_thread()

    def _start_thread(self) -> None:
        self._started = True
        threading.Thread(target=self._run, name="span-export", daemon=True).start()

    def _run(self) -> None:
        with self._send_lock:
            self._connection()  # the helper, before there are spans to send
        while not self._stopped:
            self._wake.wait(self._delay)
            self._wake.clear()
            try:
                self._send_all()
            except Exception:  # noqa: BLE001 - the thread must go on: what it held is lost
                log.exception("sending spans failed")

    def _forked(self) -> None:
        """In a fork: its parent's thread, helper, socket and queued spans are not its
        own (and a lock its parent's thread held would never be released)."""
        self._started = False
        if self._socket is not None:
            self._socket.close()  # the child's copy: the parent's helper sees its end
        self._helper = self._socket = None
        self._queue.clear()
        self._send_lock = threading.Lock()
        self._wake = threading.Event()

    def _send_all(self) -> None:
        with self._send_lock:
            if self._stopped:  # shutdown sends the rest
                return
            self._read_reports()
            while self._queue:
                self._send(self._take())

    def _take(self) -> list[tuple[Any, ...]]:
        return [self._queue.popleft().record()
                for _ in range(min(len(self._queue), MESSAGE_SPANS))]

    def _send(self, batch: list[tuple[Any, ...]], wait: float = 0.0) -> None:
        """Sends ``batch`` in messages of at most MAX_MESSAGE bytes; what cannot be sent
        now (or within ``wait`` seconds) is dropped."""
        try:
            message = COUNT.pack(len(batch)) + marshal.dumps(batch)
        except ValueError:  # an attribute value of a type OTLP has no place for: left out
            try:
                batch = [_plain(record) for record in batch]
                message = COUNT.pack(len(batch)) + marshal.dumps(batch)
            except ValueError:  # not an attribute's: no span of ours should have it
                log.exception("spans that cannot be sent (dropped)")
                self._drop(len(batch))
                return
        if len(message) > MAX_MESSAGE:
            if len(batch) == 1:
                self._drop(1)  # one span of 60 KB of attributes: not ours to carry
                return
            half = len(batch) // 2
            self._send(batch[:half], wait)
            self._send(batch[half:], wait)
            return
        connection = self._connection()
        if connection is None:
            self._drop(len(batch))
            return
        deadline = time.monotonic() + wait
        while True:
            try:
                connection.send(message)
                return
            except BlockingIOError:  # the helper is behind: its socket is full
                left = deadline - time.monotonic()
                if left <= 0:
                    self._drop(len(batch))
                    return
                select.select([], [connection], [], min(left, 0.1))
            except OSError:  # the helper is gone
                self._drop(len(batch))
                self._lost_helper()
                return

    def _connection(self) -> socket.socket | None:
        """The socket to a running helper, which is started if need be (None: it cannot
        be, for now)."""
        if self._helper is not None and self._helper.poll() is not None:
            self._lost_helper()
        if self._socket is not None:
            return self._socket
        now = time.monotonic()
        if now < self._next_start:
            return None
        self._started_helper = now
        self._next_start = now + RESTART_SECONDS  # if it cannot be started now
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:  # out of file descriptors, say
            log.error("cannot start the span export process (%s): spans are dropped", exc)
            return None
        try:
            environment = dict(os.environ)
            environment["PYTHONPATH"] = os.pathsep.join(
                filter(None, [_ROOT, environment.get("PYTHONPATH")]))
            self._helper = subprocess.Popen(
                [sys.executable, "-m", "app.telemetry.export_process", str(theirs.fileno()),
                 *self._helper_args], pass_fds=(theirs.fileno(),), env=environment,
                stdin=subprocess.DEVNULL)
        except OSError as exc:
            log.error("cannot start the span export process (%s): spans are dropped", exc)
            ours.close()
            return None
        finally:
            theirs.close()
        ours.setblocking(False)
        self._socket = ours
        return ours

    def _lost_helper(self) -> None:
        now = time.monotonic()
        quick = now - self._started_helper < 60  # a setting it cannot work with, say
        self._restart_after = min(self._restart_after * 2, MAX_RESTART_SECONDS) if quick \
            else RESTART_SECONDS
        self._next_start = now + self._restart_after
        if self._helper is not None and self._helper.poll() is not None:
            log.error("the span export process exited (%s): started again in %d s",
                      self._helper.returncode, self._restart_after)
        if self._socket is not None:
            self._socket.close()
        self._helper = self._socket = None

    def _read_reports(self) -> None:
        """The helper's counts of spans it dropped (failed exports, a full backlog)."""
        while self._socket is not None:
            try:
                report = self._socket.recv(COUNT.size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._lost_helper()
                return
            if len(report) != COUNT.size:
                return
            self._drop(COUNT.unpack(report)[0])

    def _drop(self, count: int) -> None:
        self.dropped += count
        self._on_dropped(count)
        now = time.monotonic()
        if now - self._warned >= 60:
            self._warned = now
            log.warning("dropped %d trace spans so far: the collector is slow or down, "
                        "or the export queue (%d) is full", self.dropped, self._max_queue)

    def shutdown(self) -> None:
        """Sends what is queued and lets the helper export it, within SHUTDOWN_SECONDS
        for all of it; then the helper is stopped."""
        if self._stopped:
            return
        self._stopped = True
        self._wake.set()
        deadline = time.monotonic() + SHUTDOWN_SECONDS
        if not self._started:
            return  # nothing was ever queued in this process
        with self._send_lock:
            while self._queue:
                self._send(self._take(), wait=max(0.0, deadline - time.monotonic()))
            helper, connection = self._helper, self._socket
            if helper is None or connection is None:
                return
            try:
                connection.shutdown(socket.SHUT_WR)  # the helper's end of input
                helper.wait(max(0.1, deadline - time.monotonic()))
            except (OSError, subprocess.TimeoutExpired):
                log.warning("the span export process did not finish in %d s: stopped",
                            SHUTDOWN_SECONDS)
                helper.kill()
            connection.close()


PLAIN = (str, bool, int, float)
ATTRIBUTES = 8  # where a span record (app.telemetry.tracing.Span.end) has its attributes


def _plain(record: tuple[Any, ...]) -> tuple[Any, ...]:
    """The record with only the attribute values OTLP takes (and marshal writes)."""
    attributes = {key: value for key, value in record[ATTRIBUTES].items()
                  if type(value) in PLAIN}
    return record[:ATTRIBUTES] + (attributes,) + record[ATTRIBUTES + 1:]


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, "")))
    except ValueError:
        return default


def _delay() -> float:
    try:
        return max(0.01, float(os.environ.get("OTEL_BSP_SCHEDULE_DELAY", "")) / 1000)
    except ValueError:
        return DEFAULT_DELAY

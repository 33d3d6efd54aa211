"""The span export helper process (started by app.telemetry.span_export): reads batches of
spans from its socket, builds the OpenTelemetry SDK's spans from them and exports them
with the SDK's OTLP exporter (HTTP/protobuf, or gRPC when OTEL_EXPORTER_OTLP_PROTOCOL
says so), which reads the OTEL_EXPORTER_OTLP_* settings from the environment.

``python -m app.telemetry.export_process FD URL SERVICE ROLE BATCH``: FD is the socket,
URL the traces endpoint ("" to take the environment's), SERVICE and ROLE make
``service.name``, BATCH is the spans of one export at most (messages that came meanwhile
are exported together).

Batches are read as soon as they come, into a backlog of at most MAX_BACKLOG; the spans
of a batch that does not fit, or whose export fails, are reported back as dropped. The
helper runs only on a CPU nothing else wants (SCHED_IDLE). It ignores
SIGINT and SIGTERM: its parent decides when it stops, by closing its end
of the socket (also when it dies), and then waits a bounded time for the last export.
"""
from __future__ import annotations

import importlib
import logging
import marshal
import os
import queue
import signal
import socket
import sys
import threading
import time
from typing import Any, cast

NICENESS = 10


def _yield_the_cpu() -> None:
    """The helper runs when a CPU is idle (Linux's SCHED_IDLE; elsewhere nice +10): on
    a busy host the processes that serve requests have the CPU, not it. Measured at 100%
    sampling (with the bench method before the one in bench/RESULTS.md, issue 27),
    stream c=256 went from 0.82x of tracing off with the helper at normal priority to
    0.89x. A helper that falls behind drops spans, counted."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(NICENESS)


if __name__ == "__main__":  # before the imports below: a quarter second of CPU
    _yield_the_cpu()

from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan  # noqa: E402
from opentelemetry.sdk.trace.export import SpanExportResult  # noqa: E402
from opentelemetry.sdk.util.instrumentation import InstrumentationScope  # noqa: E402
from opentelemetry.trace import (Link, SpanContext, SpanKind, Status, StatusCode,  # noqa: E402
                                 TraceFlags, TraceState)

from app.telemetry.span_export import COUNT, SHUTDOWN_SECONDS, protocol  # noqa: E402

MAX_MESSAGE = 64 * 1024
MAX_BACKLOG = 16  # batches read and not yet exported
INT64 = range(-(1 << 63), 1 << 63)  # what an OTLP int attribute holds
MAX_VALUE = 4096  # characters of an attribute's string value (the SDK's limit is unset)
# The exporter's loggers: a line per failed try of every batch while a collector is down
QUIETED_LOGGERS = ("opentelemetry.exporter.otlp.common.http",
                   "opentelemetry.exporter.otlp.proto.http.trace_exporter",
                   "opentelemetry.exporter.otlp.proto.grpc.exporter")

SAMPLED = TraceFlags(TraceFlags.SAMPLED)
UNSET = Status()

log = logging.getLogger("flaskchat.tracing")


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s [span export] %(message)s")
    # A collector that is down would log each failed batch (a line a second, forever):
    # one line a minute, and the dropped-span count, say it.
    once_a_minute = _OncePerMinute()
    for name in QUIETED_LOGGERS:
        logging.getLogger(name).addFilter(once_a_minute)
    connection = socket.socket(fileno=int(argv[0]))
    connection.setblocking(True)  # a gevent parent made it non-blocking
    url, service, role, max_export = argv[1], argv[2], argv[3], int(argv[4])
    exporter, build = _exporter(url), _Builder(service, role)
    backlog: queue.Queue[bytes | None] = queue.Queue(MAX_BACKLOG)
    threading.Thread(target=_read, args=(connection, backlog), daemon=True).start()
    finished = False
    while not finished:
        messages = [backlog.get()]
        # Whatever else has come, up to an export's worth of spans: fewer, larger exports
        # (the HTTP round trip is a fifth of the cost of a batch of 256)
        while messages[-1] is not None and sum(map(_count, messages)) < max_export:
            try:
                messages.append(backlog.get_nowait())
            except queue.Empty:
                break
        if messages[-1] is None:  # the parent closed its end: what was read is exported
            finished = True
            messages.pop()
            # within the parent's wait, or (a parent that died) before a retrying
            # exporter keeps an orphan around
            deadline = threading.Timer(SHUTDOWN_SECONDS, os._exit, (0,))
            deadline.daemon = True
            deadline.start()
        if messages:
            _export(exporter, build, cast("list[bytes]", messages), connection)
    exporter.shutdown()
    return 0


def _count(message: bytes | None) -> int:
    return COUNT.unpack_from(message)[0] if message else 0


def _read(connection: socket.socket, backlog: queue.Queue[bytes | None]) -> None:
    while True:
        try:
            message = connection.recv(MAX_MESSAGE)
        except OSError:
            message = b""
        if not message:
            backlog.put(None)
            return
        try:
            backlog.put_nowait(message)
        except queue.Full:  # the collector is slower than the spans come
            _report(connection, COUNT.unpack_from(message)[0])


def _export(exporter: Any, build: _Builder, messages: list[bytes],
            connection: socket.socket) -> None:
    count = sum(map(_count, messages))
    try:
        spans = [build(record) for message in messages
                 for record in marshal.loads(message[COUNT.size:])]
        succeeded = exporter.export(spans) is SpanExportResult.SUCCESS
    except Exception:  # noqa: BLE001 - a collector's trouble, or a bad batch: counted
        log.debug("export failed", exc_info=True)
        succeeded = False
    if not succeeded:
        _report(connection, count)


def _report(connection: socket.socket, dropped: int) -> None:
    try:
        connection.send(COUNT.pack(dropped), socket.MSG_DONTWAIT)
    except OSError:  # a parent that does not read reports (or is gone) loses them
        pass


class _OncePerMinute(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._last = -60.0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._last < 60:
            return False
        self._last = now
        return True


class _Builder:
    """The SDK's ReadableSpan of a span record (app.telemetry.tracing.Span.end)."""

    def __init__(self, service: str, role: str) -> None:
        # OTEL_RESOURCE_ATTRIBUTES are merged in by Resource.create
        made = Resource.create({"service.name": f"{service}-{role}",
                                "service.namespace": service, "flaskchat.role": role})
        self.resource = _HashedOnce(made.attributes, made.schema_url)
        self.scope = InstrumentationScope("flaskchat")

    def __call__(self, record: tuple[Any, ...]) -> Any:
        (name, trace_id, span_id, parent_id, remote_parent, kind, start, end, attributes,
         error, links, tracestate) = record
        state = TraceState.from_header([tracestate]) if tracestate else None
        context = SpanContext(trace_id, span_id, False, SAMPLED, state)
        parent = SpanContext(trace_id, parent_id, remote_parent, SAMPLED, state) \
            if parent_id else None
        return ReadableSpan(
            name=str(name)[:MAX_VALUE], context=context, parent=parent,
            resource=self.resource, attributes=_clean(attributes),
            links=[Link(SpanContext(t, s, False, SAMPLED)) for t, s in links],
            kind=SpanKind(kind), instrumentation_scope=self.scope,
            status=Status(StatusCode.ERROR, error) if error is not None else UNSET,
            start_time=start, end_time=end)


class _HashedOnce(Resource):
    """The SDK's Resource, hashed once: the encoder groups spans by resource, and
    Resource's hash is a JSON dump of its attributes (7% of an export's time)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    """Only the value types OTLP attributes take; long strings cut."""
    cleaned: dict[str, Any] = {}
    for key, value in attributes.items():
        if isinstance(value, str):
            cleaned[key] = value[:MAX_VALUE]
        elif isinstance(value, (bool, float)) or (isinstance(value, int) and value in INT64):
            cleaned[key] = value
        elif isinstance(value, int):  # the encoder would fail the whole export
            cleaned[key] = str(value)
    return cleaned


def _exporter(url: str) -> Any:
    if protocol() == "grpc":  # a collector's address, without OTLP/HTTP's path
        # (not a dependency: it brings grpcio; span_export.missing_exporter checked it)
        grpc = importlib.import_module("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
        url = url.removesuffix("/v1/traces")
        return grpc.OTLPSpanExporter(endpoint=url) if url else grpc.OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=url) if url else OTLPSpanExporter()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""OpenTelemetry traces: off unless an OTLP endpoint is configured, then every process
(gateway, worker, controller) sends its spans to the collector over OTLP/HTTP (protobuf),
or gRPC, with OpenTelemetry's SDK exporter.

Configuration is OpenTelemetry's own: ``--otlp-traces-endpoint URL`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` turn it on;
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_TIMEOUT``, ``OTEL_RESOURCE_ATTRIBUTES``
are read by the exporter; ``OTEL_TRACES_SAMPLER(_ARG)`` by app.telemetry.sampling;
``OTEL_SERVICE_NAME`` (default "flaskchat") gets the process's role appended
(``flaskchat-gateway``, ``-worker``, ``-controller``); ``OTEL_SDK_DISABLED=true`` keeps it
off.

Why spans are recorded here and not with the SDK's tracer: measured on the gateway, a span's
life in the SDK (sampler, span object, attribute checks, processor) cost ~25 us and its
protobuf encoding ~40 us, all on the CPU of a gevent process that serves every request;
at 100% sampling that took 15-30% of the gateway's throughput. A span here is a small
object ended into a bounded queue (~2 us); app.telemetry.span_export ships the queue in
batches to a helper process, which builds the SDK's spans and exports them with the SDK's
OTLP exporter. Spans are dropped and counted, never waited for, when the collector is
slow or down.

The spans of one request are linked explicitly through the objects that live as long as
it (the gateway's ``Call``, the worker's request), not through ambient context: a
stream's generator runs after Flask's request context is gone, and a worker's generation
runs in other threads.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Any, Callable, Iterator, Mapping, MutableMapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from app.telemetry import trace_context
from app.telemetry.sampling import Sampling, from_environment
from app.web.request_id import CURRENT

log = logging.getLogger("flaskchat.tracing")

# Whether tracing is on in this process; every helper below returns at once when not.
ENABLED = False
_SAMPLING = Sampling(1.0, follow_caller=True)
_EXPORT: Any = None  # an app.telemetry.span_export.SpanShipper, once on
_DROPPED_HOOKS: list[Callable[[int], None]] = []

MAX_LINKS = 128  # the SDK's default limit of links per span
# OTLP's span kinds (the SDK's SpanKind values) and status codes
INTERNAL, SERVER, CLIENT = 0, 1, 2
STATUS_ERROR = 2


def endpoint(flag: str | None) -> str | None:
    """Where traces go (None: off). The flag is a full URL, or a collector's base URL to
    which /v1/traces is added; without it the exporter reads OTEL_EXPORTER_OTLP_*."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if flag:
        base = flag.rstrip("/")
        return base if base.endswith("/v1/traces") else base + "/v1/traces"
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or \
            os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return ""  # the exporter's own reading of the environment
    return None


def configure(role: str, flag: str | None = None) -> bool:
    """Sets tracing up in this process (after any fork: gunicorn builds the app in each
    worker process) when an endpoint is configured; True if it is on."""
    global ENABLED, _SAMPLING, _EXPORT
    url = endpoint(flag)
    if url is None or ENABLED:
        return ENABLED
    from app.telemetry import span_export

    problem = span_export.missing_exporter()
    if problem:
        log.error("tracing is configured but %s: no traces", problem)
        return False
    base = os.environ.get("OTEL_SERVICE_NAME") or "flaskchat"
    _SAMPLING = from_environment(role)
    _EXPORT = span_export.SpanShipper(url, base, role, dropped=_dropped)
    if role != "controller":  # (whose registrations and refreshes make no spans)
        _EXPORT.start()  # its helper's start-up (a fork, the SDK's imports) before traffic
    ENABLED = True
    import atexit

    atexit.register(shutdown)
    log.info("tracing on: spans to %s as %s-%s",
             _without_credentials(url) or "the OTEL_EXPORTER_OTLP_* endpoint", base, role)
    return True


def _without_credentials(url: str) -> str:
    """The URL for a log line or a span: a user:password@ in it stays out."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=host))


def address(target: Any) -> str:
    """A span's ``server.address`` for an upstream: its URL (a worker's, or an
    OpenAI-compatible upstream's base URL) without any credentials in it."""
    return _address(str(getattr(target, "base_url", target)))


@lru_cache(maxsize=1024)  # a deployment's few upstreams, on every traced attempt
def _address(url: str) -> str:
    return _without_credentials(url)


def shutdown() -> None:
    """Exports what is left (bounded by span_export.SHUTDOWN_SECONDS): at exit, after the
    drain."""
    if _EXPORT is not None:
        _EXPORT.shutdown()


def on_dropped(hook: Callable[[int], None]) -> None:
    """``hook(n)`` is called when n spans are dropped (a full queue, a failed export)."""
    _DROPPED_HOOKS.append(hook)


def _dropped(count: int) -> None:
    for hook in _DROPPED_HOOKS:
        hook(count)


# ---- spans -------------------------------------------------------------------------------

def outgoing(headers: Mapping[str, str] | None) -> Mapping[str, str] | None:
    """``headers`` with the ``traceparent`` (and ``tracestate``) of the trace of the
    request the current greenlet (or thread) works for, if any."""
    if not ENABLED:
        return headers
    trace: Trace | None = getattr(CURRENT.get(None), "trace", None)
    if trace is None:
        return headers
    carrier = dict(headers) if headers else {}
    trace.inject(carrier)
    return carrier


# The span that work started now hangs under, per greenlet (or thread): a request's
# concurrent attempts (embedding batches, n choices) each have their own.
_CURRENT: "ContextVar[Span | None]" = ContextVar("flaskchat_span", default=None)


class Span:
    """A span being recorded: ``end()`` queues it for export (itself: the export thread
    reads it, app.telemetry.span_export). As a context manager (``Trace.child``) it is
    the current span while its block runs, and an exception marks it failed.

    Every traced request makes a few of these; each object the collector tracks made
    its young collections come more often (measured: 13 more per traced stream took the
    gateway's collection time from 49-66 to 84-100 us per request), hence a plain class
    instead of a generator context manager, and no record tuple until it is sent."""

    __slots__ = ("trace", "trace_id", "tracestate", "name", "span_id", "parent_id",
                 "remote_parent", "kind", "start", "end_time", "attributes", "error",
                 "links", "_token")

    def __init__(self, trace: Trace, name: str, parent_id: int, kind: int,
                 attributes: Mapping[str, Any] | None, start: int | None = None) -> None:
        self.trace: Trace | None = trace  # None once ended
        self.trace_id = trace.trace_id
        self.tracestate = trace.tracestate
        self.name = name
        self.span_id = trace_context.new_span_id()
        self.parent_id = parent_id
        self.remote_parent = parent_id == trace.remote_parent and parent_id != 0
        self.kind = kind
        self.start = start or time.time_ns()
        self.end_time = 0
        self.attributes = dict(attributes) if attributes else {}
        self.error: str | None = None
        self.links: Sequence[tuple[int, int]] = ()
        self._token: Any = None

    def set_attribute(self, key: str, value: Any) -> None:
        if self.trace is not None:  # (an ended span may be being sent)
            self.attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if self.trace is not None:
            self.attributes.update(attributes)

    def fail(self, message: str) -> None:
        self.error = message[:200]

    def end(self, end: int | None = None) -> None:
        """Ends it (``end``: time.time_ns(), now by default); a second end is ignored."""
        if self.trace is None:
            return
        # A trace and its root span refer to each other: without that loop, a request's
        # spans are freed when it ends, not by a later (older, slower) collection.
        self.trace = None
        self.end_time = end or time.time_ns()
        _EXPORT.add(self)

    def record(self) -> tuple[Any, ...]:
        """What the export helper builds the SDK's span from (app.telemetry.export_process)."""
        return (self.name, self.trace_id, self.span_id, self.parent_id, self.remote_parent,
                self.kind, self.start, self.end_time, self.attributes, self.error,
                self.links, self.tracestate)

    def __enter__(self) -> Span:
        self._token = _CURRENT.set(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: Any) -> None:
        try:
            if exc is not None and not isinstance(exc, GeneratorExit):
                self.set_attribute("error.type", type(exc).__name__)
                self.fail(str(getattr(exc, "message", None) or exc))
        finally:  # (an exception whose text cannot be had still ends its span)
            _CURRENT.reset(self._token)
            self._token = None
            self.end()


class _Unsampled:
    """What an unsampled request's spans are: nothing is kept."""

    __slots__ = ()

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        pass

    def fail(self, message: str) -> None:
        pass

    def end(self, end: int | None = None) -> None:
        pass

    def __enter__(self) -> _Unsampled:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        pass


UNSAMPLED = _Unsampled()


class Trace:
    """One request's spans in this process: its root (``root``), and the span that work
    started now hangs under, which also goes out as ``traceparent``. An unsampled
    request's trace records nothing but still passes its trace id on, flagged unsampled,
    so that the processes behind agree."""

    __slots__ = ("trace_id", "sampled", "tracestate", "remote_parent", "root")

    def __init__(self, name: str, parent: trace_context.Parent | None, sampled: bool,
                 attributes: Mapping[str, Any] | None) -> None:
        self.trace_id = parent.trace_id if parent else trace_context.new_trace_id()
        self.sampled = sampled
        self.tracestate = parent.tracestate if parent else ""
        self.remote_parent = parent.span_id if parent else 0
        self.root: Span | _Unsampled = Span(self, name, self.remote_parent, SERVER,
                                            attributes) if sampled else UNSAMPLED

    @property
    def root_id(self) -> int:
        return self.root.span_id if isinstance(self.root, Span) else self.remote_parent

    @property
    def link(self) -> tuple[int, int] | None:
        """The root span as a link target (None: not recorded)."""
        return (self.trace_id, self.root.span_id) if isinstance(self.root, Span) else None

    def _parent_id(self) -> int:
        current = _CURRENT.get(None)
        return current.span_id if current is not None and current.trace is self \
            else self.root_id

    @property
    def trace_hex(self) -> str:
        return format(self.trace_id, "032x")

    def child(self, name: str, attributes: Mapping[str, Any] | None = None,
              client: bool = False) -> Span | _Unsampled:
        """A span under the current one, for a ``with`` block: current itself while the
        block runs; an exception marks it failed (and goes on)."""
        if not self.sampled:
            return UNSAMPLED
        return Span(self, name, self._parent_id(), CLIENT if client else INTERNAL, attributes)

    def open(self, name: str, attributes: Mapping[str, Any] | None = None
             ) -> Span | _Unsampled:
        """A span under the current one that the caller ends (``close``); calls made
        meanwhile do not hang under it (a stream, whose generator outlives any block)."""
        if not self.sampled:
            return UNSAMPLED
        return Span(self, name, self._parent_id(), INTERNAL, attributes)

    def record(self, name: str, start: float, end: float,
               attributes: Mapping[str, Any] | None = None) -> None:
        """A span for a stretch already over (``start``/``end``: time.time() seconds),
        under the current span."""
        if self.sampled:
            Span(self, name, self._parent_id(), INTERNAL, attributes,
                 start=int(start * 1e9)).end(int(end * 1e9))

    def inject(self, headers: MutableMapping[str, str]) -> None:
        headers["traceparent"] = trace_context.traceparent(
            self.trace_id, self._parent_id() or trace_context.new_span_id(), self.sampled)
        if self.tracestate:
            headers["tracestate"] = self.tracestate


def start(name: str, incoming: Any,
          attributes: Mapping[str, Any] | None = None) -> Trace | None:
    """A request's trace and root span (a server span), continuing the W3C
    ``traceparent`` / ``tracestate`` of the ``incoming`` headers (anything with ``.get``,
    or None); None when tracing is off."""
    if not ENABLED:
        return None
    parent = trace_context.extract(incoming) if incoming is not None else None
    return Trace(name, parent, _SAMPLING.decide(parent.sampled if parent else None),
                 attributes)


def end_request(call: Any, status: int, model: str | None, principal: Any,
                ttft: float | None) -> None:
    """Ends a gateway request's root span with what the request came to (the key's name
    and team, never its secret)."""
    trace: Trace = call.trace
    call.trace = None
    root = trace.root
    if not isinstance(root, Span):
        return
    attributes = root.attributes
    attributes["http.response.status_code"] = status
    attributes["flaskchat.service_tier"] = call.service_tier
    if model:
        attributes["gen_ai.request.model"] = model
    if principal is not None:
        if principal.name:
            attributes["flaskchat.key.name"] = principal.name
        if principal.team:
            attributes["flaskchat.team"] = principal.team
    if call.meter.prompt():
        attributes["gen_ai.usage.input_tokens"] = call.meter.prompt()
    if call.meter.completion():
        attributes["gen_ai.usage.output_tokens"] = call.meter.completion()
    if ttft is not None:
        attributes["flaskchat.ttft_ms"] = round(ttft * 1000, 2)
    if call.queued:
        attributes["flaskchat.queue_ms"] = round(call.queue_seconds * 1000, 2)
    if status >= 500:
        root.fail(f"HTTP {status}")
    root.end()


def end_stream(span: Span | _Unsampled, call: Any, ended: str, broke: str | None,
               attributes: dict[str, Any]) -> None:
    """Ends a gateway request's ``stream`` span (``ended``: how; ``broke``: what the
    upstream broke off with), with the time from the request's start to its first token
    (the upstream attempt before it ends at the stream's head)."""
    attributes["flaskchat.stream.end"] = ended
    if call.first_token_at is not None:
        attributes["flaskchat.ttft_ms"] = round((call.first_token_at - call.started) * 1000, 2)
    close(span, attributes, broke)


def close(span: Span | _Unsampled, attributes: Mapping[str, Any],
          error: str | None = None) -> None:
    """Ends a span from ``Trace.open`` (``error``: what went wrong, marking it failed)."""
    span.set_attributes(attributes)
    if error is not None:
        span.fail(error)
    span.end()


@contextmanager
def background(name: str, requests: list[tuple[int, int] | None],
               attributes: Mapping[str, Any] | None = None) -> Iterator[Span | None]:
    """A span of its own trace for work done for many requests at once (a usage batch),
    linked to the requests' root spans (``requests``: their ``Trace.link``, or None) so
    that it can be found from them; not recorded when none of them was. A block that
    does nothing when tracing is off."""
    links = [link for link in requests if link is not None][:MAX_LINKS] if ENABLED else []
    if not links:
        yield None
        return
    trace = Trace(name, None, True, attributes)
    span = trace.root
    assert isinstance(span, Span)
    span.links = links
    try:
        yield span
    except BaseException as exc:
        span.set_attribute("error.type", type(exc).__name__)
        span.fail(str(exc))
        raise
    finally:
        span.end()

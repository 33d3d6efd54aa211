"""OpenTelemetry traces: off unless an OTLP endpoint is configured, then every process
(gateway, worker, controller) exports its spans over OTLP/HTTP (protobuf) with the SDK.

Configuration is OpenTelemetry's own: ``--otlp-traces-endpoint URL`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` turn it on;
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_TIMEOUT``, ``OTEL_TRACES_SAMPLER(_ARG)``
and ``OTEL_RESOURCE_ATTRIBUTES`` are read by the SDK; ``OTEL_SERVICE_NAME`` (default
"flaskchat") gets the process's role appended (``flaskchat-gateway``, ``-worker``,
``-controller``); ``OTEL_SDK_DISABLED=true`` keeps it off.

Spans never cost the request path more than their creation: finished spans go into a
bounded queue that a background thread (a greenlet under gevent, whose socket writes
yield) exports in batches. When the collector is slow or down the queue fills and spans
are dropped and counted (``dropped()``; the gateway's /metrics), never waited for.

The spans of one request are linked explicitly through the objects that live as long as
it (the gateway's ``Call``, the worker's request), not through OpenTelemetry's ambient
context: a stream's generator runs after Flask's request context is gone, and a worker's
generation runs in other threads.
"""
from __future__ import annotations

import importlib
import logging
import os
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Mapping, MutableMapping
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("flaskchat.tracing")

# None: tracing is off, and every helper below returns at once.
TRACER: Any = None
_PROPAGATOR: Any = None
_PROCESSOR: Any = None  # an app.telemetry.span_export.BoundedExport
_api: Any = None  # opentelemetry.trace, once tracing is on
_DROPPED_HOOKS: list[Callable[[int], None]] = []

DEFAULT_DELAY = 1.0  # seconds between exports (OTEL_BSP_SCHEDULE_DELAY, in ms)
MAX_LINKS = 128  # the SDK's default limit of links per span
# The exporter's loggers: a line per failed try of every batch while a collector is down
QUIETED_LOGGERS = ("opentelemetry.exporter.otlp.common.http",
                   "opentelemetry.exporter.otlp.proto.http.trace_exporter",
                   "opentelemetry.exporter.otlp.proto.grpc.exporter")


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
    global TRACER, _PROPAGATOR, _PROCESSOR, _api
    url = endpoint(flag)
    if url is None or TRACER is not None:
        return TRACER is not None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.trace.propagation.tracecontext import \
            TraceContextTextMapPropagator
    except ImportError as exc:
        log.error("tracing is configured but the OpenTelemetry SDK cannot be imported "
                  "(%s): no traces", exc)
        return False
    # A collector that is down would log each failed batch (a line a second, forever):
    # one line a minute, and the dropped-span count, say it.
    once_a_minute = _OncePerMinute()
    for name in QUIETED_LOGGERS:
        logging.getLogger(name).addFilter(once_a_minute)

    base = os.environ.get("OTEL_SERVICE_NAME") or "flaskchat"
    resource = Resource.create({"service.name": f"{base}-{role}",
                                "service.namespace": base, "flaskchat.role": role})
    options: dict[str, Any] = {}
    if role == "gateway":  # clients' sampled flags do not decide (app.telemetry.sampling)
        from app.telemetry.sampling import GatewaySampler, configured_ratio

        ratio = configured_ratio()
        if ratio is not None:
            options["sampler"] = GatewaySampler(ratio)
    provider = TracerProvider(resource=resource, shutdown_on_exit=False, **options)
    exporter = _exporter(url, flag)
    if exporter is None:
        return False
    from app.telemetry.span_export import MAX_BATCH, MAX_QUEUE, BoundedExport

    _PROCESSOR = BoundedExport(exporter, delay=_delay(), dropped=_dropped,
                               max_queue=_env_int("OTEL_BSP_MAX_QUEUE_SIZE", MAX_QUEUE),
                               max_batch=_env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", MAX_BATCH))
    provider.add_span_processor(_PROCESSOR)
    TRACER = provider.get_tracer("flaskchat")
    import opentelemetry.trace

    _api = opentelemetry.trace  # for the helpers below, without an import per call
    _PROPAGATOR = TraceContextTextMapPropagator()
    import atexit

    atexit.register(shutdown)
    log.info("tracing on: spans to %s as %s-%s",
             _without_credentials(url) or "the OTEL_EXPORTER_OTLP_* endpoint", base, role)
    return True


def _without_credentials(url: str) -> str:
    """The URL for the log: a user:password@ in it stays out."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=host))


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


def _exporter(url: str, flag: str | None) -> Any:
    """OTLP over HTTP/protobuf; over gRPC when OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL says
    grpc and opentelemetry-exporter-otlp-proto-grpc is installed (it brings grpcio, so it
    is not a dependency). None: gRPC asked for and not installed."""
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or
                os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    if protocol == "grpc":
        try:
            grpc = importlib.import_module(
                "opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
        except ImportError:
            log.error("OTLP over gRPC needs `pip install opentelemetry-exporter-otlp-proto-"
                      "grpc` (or set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf): no traces")
            return None
        return grpc.OTLPSpanExporter(endpoint=flag) if flag else grpc.OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=url) if url else OTLPSpanExporter()


def shutdown() -> None:
    """Exports what is left (bounded by SHUTDOWN_SECONDS): at exit, after the drain."""
    if _PROCESSOR is not None:
        _PROCESSOR.shutdown()


def on_dropped(hook: Callable[[int], None]) -> None:
    """``hook(n)`` is called when n spans are dropped (a full queue, a failed export)."""
    _DROPPED_HOOKS.append(hook)


def _dropped(count: int) -> None:
    for hook in _DROPPED_HOOKS:
        hook(count)


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


# ---- spans -------------------------------------------------------------------------------

# The trace of the request the current greenlet (or thread) works for: outgoing calls to
# workers and upstreams carry its current span as their ``traceparent``.
ACTIVE: "ContextVar[Trace | None]" = ContextVar("flaskchat_trace", default=None)


def outgoing(headers: Mapping[str, str] | None) -> Mapping[str, str] | None:
    """``headers`` with the active trace's ``traceparent`` (and ``tracestate``) added."""
    if TRACER is None:
        return headers
    trace = ACTIVE.get(None)
    if trace is None:
        return headers
    carrier = dict(headers) if headers else {}
    trace.inject(carrier)
    return carrier


# The span that work started now hangs under, per greenlet (or thread): a request's
# concurrent attempts (embedding batches, n choices) each have their own.
_CURRENT: "ContextVar[tuple[Trace, Any] | None]" = ContextVar("flaskchat_span", default=None)


class Trace:
    """One request's spans in this process: its root, and the span that work started now
    hangs under (``parent``), which also goes out as ``traceparent``."""

    __slots__ = ("root", "_root_context")

    def __init__(self, root: Any) -> None:
        self.root = root
        self._root_context = _api.set_span_in_context(root)

    @property
    def parent(self) -> Any:
        current = _CURRENT.get(None)
        return current[1] if current is not None and current[0] is self \
            else self._root_context

    @property
    def trace_id(self) -> str:
        return format(self.root.get_span_context().trace_id, "032x")

    @contextmanager
    def child(self, name: str, attributes: Mapping[str, Any] | None = None,
              client: bool = False) -> Iterator[Any]:
        """A span under the current one, current itself while the block runs; an
        exception marks it failed (and goes on)."""
        span = TRACER.start_span(name, context=self.parent, attributes=attributes,
                                 kind=_api.SpanKind.CLIENT if client else _api.SpanKind.INTERNAL)
        token = _CURRENT.set((self, _api.set_span_in_context(span)))
        try:
            yield span
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit):
                _failed(span, exc)
            raise
        finally:
            _CURRENT.reset(token)
            span.end()

    def open(self, name: str, attributes: Mapping[str, Any] | None = None) -> Any:
        """A span under the current one that the caller ends (``close``); calls made
        meanwhile do not hang under it (a stream, whose generator outlives any block)."""
        return TRACER.start_span(name, context=self.parent, attributes=attributes)

    def record(self, name: str, start: float, end: float,
               attributes: Mapping[str, Any] | None = None) -> None:
        """A span for a stretch already over (``start``/``end``: time.time() seconds),
        under the current span."""
        span = TRACER.start_span(name, context=self.parent, attributes=attributes,
                                 start_time=int(start * 1e9))
        span.end(end_time=int(end * 1e9))

    def inject(self, headers: MutableMapping[str, str]) -> None:
        _PROPAGATOR.inject(headers, context=self.parent)


def start(name: str, incoming: Any,
          attributes: Mapping[str, Any] | None = None) -> Trace | None:
    """A request's root span (a server span), continuing the W3C ``traceparent`` /
    ``tracestate`` of the ``incoming`` headers (anything with ``.get``); None when tracing
    is off."""
    if TRACER is None:
        return None
    context = _PROPAGATOR.extract(incoming) if incoming is not None else None
    return Trace(TRACER.start_span(name, context=context, kind=_api.SpanKind.SERVER,
                                   attributes=attributes))


def end_request(call: Any, status: int, model: str | None, principal: Any,
                ttft: float | None) -> None:
    """Ends a gateway request's root span with what the request came to (the key's name
    and team, never its secret)."""
    trace: Trace = call.trace
    root = trace.root
    attributes: dict[str, Any] = {"http.response.status_code": status,
                                  "flaskchat.service_tier": call.service_tier}
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
    root.set_attributes(attributes)
    if status >= 500:
        root.set_status(_api.Status(_api.StatusCode.ERROR, f"HTTP {status}"))
    root.end()
    call.trace = None
    if ACTIVE.get(None) is trace:
        ACTIVE.set(None)


def close(span: Any, attributes: Mapping[str, Any], error: str | None = None) -> None:
    """Ends a span from ``Trace.open`` (``error``: what went wrong, marking it failed)."""
    span.set_attributes(attributes)
    if error is not None:
        span.set_status(_api.Status(_api.StatusCode.ERROR, error[:200]))
    span.end()


@contextmanager
def background(name: str, requests: list[Any],
               attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """A span of its own trace for work done for many requests at once (a usage batch),
    linked to the requests' root spans (``requests``: their span contexts, or None) so
    that it can be found from them. A block that does nothing when tracing is off."""
    if TRACER is None:
        yield None
        return
    from opentelemetry.context import Context

    contexts = [context for context in requests if context is not None][:MAX_LINKS]
    links = [_api.Link(context) for context in contexts]
    with TRACER.start_as_current_span(name, context=Context(), links=links,
                                      attributes=attributes) as span:
        yield span


def _failed(span: Any, error: BaseException) -> None:
    span.set_attribute("error.type", type(error).__name__)
    message = getattr(error, "message", None) or str(error)
    span.set_status(_api.Status(_api.StatusCode.ERROR, message[:200]))

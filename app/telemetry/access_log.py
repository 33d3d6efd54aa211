"""What telemetry records when a request ends: one access-log line and the request metrics.

Both are taken when the response is closed (``app.web.request_end`` calls ``finished``),
so a stream counts with its whole duration, its time to first token and the tokens it
carried. The access line names the route, the model, the status and the timings, and
never a key or any message content.
"""
from __future__ import annotations

import logging

from app.serving.call import Call
from app.telemetry import metrics

ACCESS = logging.getLogger("flaskchat.access")
QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics"})  # probes: DEBUG, not INFO


def stream_opened(record_metrics: bool) -> None:
    if record_metrics:
        metrics.STREAMS.inc()


def finished(call: Call, method: str, route: str, status: int, stream: bool,
             model: str | None, seconds: float, ttft: float | None, completion_tokens: int,
             access_log: bool, record_metrics: bool) -> None:
    """``model``: a name the gateway serves, or None (a client's made-up name must neither
    grow the metric series nor write into the log)."""
    label = model or "-"
    if record_metrics:
        metrics.REQUESTS.labels(route, label, str(status)).inc()
        metrics.LATENCY.labels(route).observe(seconds)
        if ttft is not None:
            metrics.TTFT.labels(route).observe(ttft)
        if completion_tokens:
            metrics.TOKENS.labels(label).inc(completion_tokens)
        if stream:
            metrics.STREAMS.dec()
    if not access_log:
        return
    level = logging.DEBUG if route in QUIET_ROUTES else logging.INFO
    if ACCESS.isEnabledFor(level):
        fields = {"method": method, "route": route, "status": status, "model": label,
                  "stream": stream, "latency_ms": round(seconds * 1000, 2),
                  "ttft_ms": round(ttft * 1000, 2) if ttft is not None else None,
                  "completion_tokens": completion_tokens,
                  "queue_ms": round(call.queue_seconds * 1000, 2) if call.queued else None}
        trace_id = call.trace.trace_hex if call.trace is not None else None
        if trace_id:  # the line and the trace find each other
            fields["trace_id"] = trace_id
        ACCESS.log(level, "%s %s %d model=%s latency_ms=%.2f ttft_ms=%s queue_ms=%s tokens=%d%s",
                   method, route, status, label, seconds * 1000,
                   f"{ttft * 1000:.2f}" if ttft is not None else "-",
                   f"{call.queue_seconds * 1000:.2f}" if call.queued else "-", completion_tokens,
                   f" trace_id={trace_id}" if trace_id else "",
                   extra={"request_id": call.request_id, "fields": fields})

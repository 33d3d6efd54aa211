"""What is recorded when a request ends: one access-log line and the request metrics.

Both are taken when the response is closed, so a stream counts with its whole duration,
its time to first token and the tokens it carried. The access line names the route, the
model, the status and the timings, and never a key or any message content.
"""
from __future__ import annotations

import logging
from functools import partial
from time import perf_counter

from flask import Flask, Response, g, request

from app.serving.call import Call
from app.telemetry import metrics
from app.upstream.clients import Upstream
from app.web.context import upstream
from app.web.request_id import CURRENT

ACCESS = logging.getLogger("flaskchat.access")
QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics"})  # probes: DEBUG, not INFO
UNMATCHED = "unmatched"


def init_app(app: Flask, access_log: bool, record_metrics: bool) -> None:
    def track(response: Response) -> Response:
        call: Call | None = g.get("call")
        if call is None:
            return response
        route = request.url_rule.rule if request.url_rule is not None else UNMATCHED
        stream = response.mimetype == "text/event-stream"
        if stream and record_metrics:
            metrics.STREAMS.inc()
        response.call_on_close(partial(
            _finished, call, upstream(), request.method, route, response.status_code, stream,
            access_log, record_metrics))
        return response

    app.after_request(track)


def _finished(call: Call, upstream: Upstream, method: str, route: str, status: int,
              stream: bool, access_log: bool, record_metrics: bool) -> None:
    seconds = perf_counter() - call.started
    ttft = call.first_token_at - call.started if call.first_token_at is not None else None
    # Only names the gateway knows become labels or log text: a client's made-up model
    # name must neither grow the metric series nor write into the log.
    model = call.model if call.model and (upstream.controller.knows(call.model)
                                          or upstream.openai.serves(call.model)) else "-"
    if record_metrics:
        metrics.REQUESTS.labels(route, model, str(status)).inc()
        metrics.LATENCY.labels(route).observe(seconds)
        if ttft is not None:
            metrics.TTFT.labels(route).observe(ttft)
        if call.completion_tokens:
            metrics.TOKENS.labels(model).inc(call.completion_tokens)
        if stream:
            metrics.STREAMS.dec()
    if access_log:
        level = logging.DEBUG if route in QUIET_ROUTES else logging.INFO
        if ACCESS.isEnabledFor(level):
            fields = {"method": method, "route": route, "status": status, "model": model,
                      "stream": stream, "latency_ms": round(seconds * 1000, 2),
                      "ttft_ms": round(ttft * 1000, 2) if ttft is not None else None,
                      "completion_tokens": call.completion_tokens}
            ACCESS.log(level, "%s %s %d model=%s latency_ms=%.2f ttft_ms=%s tokens=%d",
                       method, route, status, model, seconds * 1000,
                       f"{ttft * 1000:.2f}" if ttft is not None else "-",
                       call.completion_tokens,
                       extra={"request_id": call.request_id, "fields": fields})
    if CURRENT.get(None) is call:
        CURRENT.set(None)

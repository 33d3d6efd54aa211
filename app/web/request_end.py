"""The one end of every request: when its response is closed (a stream when it ends, or
when its client leaves), what the request used, as its paths handed it to ``call.meter``,
settles its key's reservation, charges its budget and writes its usage record
(``app.web.access.charge``), then counts the request metrics and writes the access line
(``app.telemetry.access_log``). No route or serving path does any of that itself, so a
new one cannot forget it.
"""
from __future__ import annotations

from functools import partial
from time import perf_counter
from typing import TYPE_CHECKING

from flask import Flask, Response, g, request

from app.telemetry import access_log, tracing
from app.web import access
from app.web.context import upstream
from app.web.request_id import CURRENT

if TYPE_CHECKING:
    from app.access.directory import Principal
    from app.access.gate import Gate
    from app.serving.call import Call
    from app.telemetry.metrics import AccessMetrics
    from app.upstream.clients import Upstream

UNMATCHED = "unmatched"


def init_app(app: Flask, log_access: bool, record_metrics: bool) -> None:
    def hand_over(response: Response) -> Response:
        current: Call | None = g.get("call")
        if current is None:
            return response
        g.handed_over = True
        admitted = current.admitted
        if admitted is not None:
            response.headers.extend(admitted.headers())  # new names: no look-up of old ones
        principal: Principal | None = g.pop("usage_principal", None)
        gate = access.access().gate if principal is not None else None
        route = request.url_rule.rule if request.url_rule is not None else UNMATCHED
        stream = response.mimetype == "text/event-stream"
        if stream:
            access_log.stream_opened(record_metrics)
        response.call_on_close(partial(
            _ended, gate, access.key_metrics(), upstream(), current, principal,
            request.method, route, response.status_code, stream, log_access,
            record_metrics))
        return response

    def release_unless_handed_over(error: BaseException | None) -> None:
        current: Call | None = g.get("call")
        if current is not None and not g.get("handed_over"):
            current.release_slot(None)
            access.release_unfinished(current)
            if current.trace is not None:
                tracing.end_request(current, 500, None, None, None)

    app.after_request(hand_over)
    app.teardown_request(release_unless_handed_over)


def _ended(gate: "Gate | None", key_metrics: "AccessMetrics | None", served: "Upstream",
           current: "Call", principal: "Principal | None", method: str, route: str,
           status: int, stream: bool, log_access: bool, record_metrics: bool) -> None:
    current.release_slot(current.meter.prompt() + current.meter.completion())
    latency = perf_counter() - current.started
    ttft = current.first_token_at - current.started if current.first_token_at else None
    model = _known(served, current.model)
    completion = current.meter.completion()
    if gate is not None and principal is not None:
        _, completion = access.charge(gate, key_metrics, current, principal, route, status,
                                      model, latency, ttft)
    access_log.finished(current, method, route, status, stream, model, latency, ttft,
                        completion, log_access, record_metrics)
    if current.trace is not None:
        tracing.end_request(current, status, model, principal, ttft)
    if CURRENT.get(None) is current:
        CURRENT.set(None)


def _known(served: "Upstream", model: str) -> str | None:
    """Only names the gateway serves are recorded: a client's made-up model name does not
    become a row of every report, a metric series or a word in the log."""
    return model if model and (served.controller.knows(model)
                               or served.openai.serves(model)) else None

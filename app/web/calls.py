"""The gateway's per-request record (``app.serving.call.Call``): made when a request
starts, with its request id and a watch on the client's socket, and turned into the
X-Request-ID and Server-Timing headers of the response."""
from __future__ import annotations

from flask import Flask, Response, g, request

from app.serving.call import Call
from app.telemetry import tracing
from app.telemetry.access_log import QUIET_ROUTES
from app.serving.ids import new_id
from app.web.client_watch import watcher
from app.web.request_id import CURRENT, HEADER, is_sane_request_id


KNOWN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"))


def init_app(app: Flask) -> None:
    app.before_request(_start)
    app.after_request(_finish)


def _start() -> None:
    incoming = request.headers.get(HEADER, "")
    g.call = Call(incoming if is_sane_request_id(incoming) else new_id("req-"),
                  client_gone=watcher(request.environ))
    CURRENT.set(g.call)
    if tracing.ENABLED:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        if route not in QUIET_ROUTES:  # probes would bury the requests
            # A method the client made up (up to a request line's length) is not a name
            method = request.method if request.method in KNOWN_METHODS else "_OTHER"
            g.call.trace = tracing.start(
                f"{method} {route}", request.headers,
                {"http.request.method": method, "http.route": route,
                 "flaskchat.request_id": g.call.request_id})


def _finish(response: Response) -> Response:
    call: Call | None = g.get("call")
    if call is not None:
        response.headers[HEADER] = call.request_id
        response.headers["Server-Timing"] = call.server_timing()
    return response

"""The request id: the client's X-Request-ID if it is sane, else a new one. It is returned
in the response, sent to the worker, and stamped on every log line of the request."""
from __future__ import annotations

import logging
import re
from contextvars import ContextVar

from flask import Flask, Response, g

from app.serving.call import Call
from app.web.client_watch import watcher
from app.serving.ids import new_id

HEADER = "X-Request-ID"
_SANE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

# The call being served by this greenlet (or thread). Unlike flask.g it is still there
# while a stream's generator runs, after Flask has popped the request context.
CURRENT_CALL: ContextVar[Call | None] = ContextVar("flaskchat_call", default=None)


def is_sane_request_id(value: str) -> bool:
    """Safe to echo and to log: no spaces, no control characters, bounded."""
    return bool(_SANE.match(value))


def init_app(app: Flask) -> None:
    app.before_request(_start)
    app.after_request(_finish)


def _start() -> None:
    from flask import request

    incoming = request.headers.get(HEADER, "")
    g.call = Call(incoming if is_sane_request_id(incoming) else new_id("req-"),
                  client_gone=watcher(request.environ))
    CURRENT_CALL.set(g.call)


def _finish(response: Response) -> Response:
    call: Call | None = g.get("call")
    if call is not None:
        response.headers[HEADER] = call.request_id
        response.headers["Server-Timing"] = call.server_timing()
    return response


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every record that has none ("-" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            call = CURRENT_CALL.get(None)
            record.request_id = call.request_id if call is not None else "-"
        return True

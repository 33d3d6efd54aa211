"""The request id: the client's X-Request-ID if it is sane, else a new one. It is returned
in the response, sent to workers and upstreams, and stamped on every log line of the
request (the worker logs its generations with the gateway's id)."""
from __future__ import annotations

import re
from contextvars import ContextVar
from typing import Protocol

HEADER = "X-Request-ID"
_SANE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class Identified(Protocol):
    request_id: str


# What the current greenlet (or thread) works for. Unlike flask.g it is still there while
# a stream's generator runs, after Flask has popped the request context.
CURRENT: ContextVar[Identified | None] = ContextVar("flaskchat_request", default=None)


def is_sane_request_id(value: str) -> bool:
    """Safe to echo and to log: no spaces, no control characters, bounded."""
    return bool(_SANE.match(value))


def current_request_id() -> str:
    current = CURRENT.get(None)
    return current.request_id if current is not None else "-"

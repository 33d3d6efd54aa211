"""The pooled requests.Session for all backend traffic, and requests' errors mapped to ours.

requests' exceptions never leave app/upstream/: callers see WorkerUnreachable (could not
connect), UpstreamTimeout (no bytes within the read timeout) or UpstreamError (anything
else that went wrong on the wire).
"""
from __future__ import annotations

import re
from types import TracebackType
from typing import Any, Mapping

import orjson
import requests
from requests.models import PreparedRequest
from requests.structures import CaseInsensitiveDict

from app.errors import (APIError, ConnectTimedOut, InvalidRequest, UpstreamError,
                        UpstreamTimeout, WorkerUnreachable)
from app.telemetry import tracing
from app.upstream.connection import InvalidResponse
from app.upstream.transport import HttpTransport

USER_AGENT = "flaskchat"
JSON_HEADERS = {"User-Agent": USER_AGENT, "Content-Type": "application/json",
                "Accept": "*/*"}


def build_session(pool_size: int) -> requests.Session:
    """One Session per process: keep-alive pools sized for every open stream."""
    session = requests.Session()
    # Without this, every call scans the environment for proxies and .netrc (~0.25 ms).
    session.trust_env = False
    transport = HttpTransport(max_idle=pool_size)
    session.mount("http://", transport)
    session.mount("https://", transport)
    # Exactly what the transport decodes (requests would add br or zstd when installed).
    session.headers.update({"User-Agent": USER_AGENT, "Accept-Encoding": "gzip, deflate"})
    return session


def post_json(session: requests.Session, url: str, payload: Any, timeout: tuple[float, float],
              stream: bool = False, headers: Mapping[str, str] | None = None
              ) -> requests.Response:
    """POSTs ``payload`` as JSON (orjson) straight to the Session's adapter for ``url``.

    Session.request would merge environment, cookie, auth and redirect settings that these
    calls never use (about a third of a call's cost); the adapter still does the sending,
    so pooling and timeouts are requests' own.
    """
    request = PreparedRequest()
    request.method = "POST"
    request.url = url
    try:
        request.body = orjson.dumps(payload)
    except orjson.JSONEncodeError:  # what a client sent nests deeper than orjson writes
        raise InvalidRequest("The request nests JSON deeper than 255 levels; no model "
                             "server takes that.") from None
    headers = tracing.outgoing(headers)
    request.headers = CaseInsensitiveDict({**JSON_HEADERS, **headers} if headers
                                          else JSON_HEADERS)
    adapter = session.get_adapter(url)
    response: requests.Response = adapter.send(request, stream=stream, timeout=timeout)
    return response


def _reason(exc: Exception) -> str:
    """The last line of an exception chain's text: 'Connection refused' and the like."""
    text = str(exc.args[0] if exc.args else exc)
    return text.rsplit(": ", 1)[-1].strip(" ')\"")[:120] or type(exc).__name__


_SHAREABLE = re.compile(r"^[\w \[\]()-]*$")  # no quote, dot, colon or slash: no address


class mapped_errors:
    """Re-raises requests' exceptions as ours, naming ``what`` we were talking to. (A class,
    not a generator-based context manager: entered several times a request, and a
    generator costs four times as much to set up.)"""

    __slots__ = ("_what",)

    def __init__(self, what: str) -> None:
        self._what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if exc is None or not isinstance(exc, requests.exceptions.RequestException):
            return  # nothing of requests': it goes on as it is
        what = self._what
        reason = _reason(exc)
        # A reason that may name a host ("certificate is not valid for 'gpu-7.internal'")
        # goes to the logs only; "Connection refused" and the like to the client too.
        shown = f" ({reason})" if _SHAREABLE.match(reason) else ""
        error: APIError
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            error = ConnectTimedOut(f"Timed out connecting to {what}.")
        elif isinstance(exc, requests.exceptions.Timeout):
            error = UpstreamTimeout(f"{what} did not answer in time.")
        elif isinstance(exc, (requests.exceptions.ChunkedEncodingError, InvalidResponse)):
            error = UpstreamError(f"{what} broke off or garbled its answer{shown}.")
        elif isinstance(exc, requests.exceptions.ConnectionError):
            error = WorkerUnreachable(f"Could not connect to {what}{shown}.")
        else:
            error = UpstreamError(f"Error talking to {what}: {type(exc).__name__}.")
        error.internal = reason
        raise error from None

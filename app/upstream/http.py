"""The pooled requests.Session for all backend traffic, and requests' errors mapped to ours.

requests' exceptions never leave app/upstream/: callers see WorkerUnreachable (could not
connect), UpstreamTimeout (no bytes within the read timeout) or UpstreamError (anything
else that went wrong on the wire).
"""
from __future__ import annotations

from contextlib import contextmanager
from http.client import RemoteDisconnected
from typing import Any, Iterator, Mapping

import orjson
import requests
from requests.adapters import HTTPAdapter
from requests.models import PreparedRequest
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from app.errors import ConnectTimedOut, UpstreamError, UpstreamTimeout, WorkerUnreachable
from app.upstream.transport import HttpTransport

USER_AGENT = "flaskchat"
JSON_HEADERS = {"User-Agent": USER_AGENT, "Content-Type": "application/json",
                "Accept": "*/*"}


def build_session(pool_size: int) -> requests.Session:
    """One Session per process: keep-alive pools sized for every open stream."""
    session = requests.Session()
    # Without this, every call scans the environment for proxies and .netrc (~0.25 ms).
    session.trust_env = False
    session.mount("http://", HttpTransport(max_idle=pool_size))
    session.mount("https://", HTTPAdapter(pool_connections=16, pool_maxsize=pool_size,
                                          max_retries=0, pool_block=False))
    session.headers.update({"User-Agent": USER_AGENT})
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
    request.body = orjson.dumps(payload)
    request.headers = CaseInsensitiveDict({**JSON_HEADERS, **headers} if headers
                                          else JSON_HEADERS)
    adapter = session.get_adapter(url)
    try:
        response: requests.Response = adapter.send(request, stream=stream, timeout=timeout)
    except requests.exceptions.ConnectionError as exc:
        if not _stale_connection(exc):
            raise
        response = adapter.send(request, stream=stream, timeout=timeout)
    return response


def _reason(exc: Exception) -> str:
    """The last line of an exception chain's text: 'Connection refused' and the like."""
    text = str(exc.args[0] if exc.args else exc)
    return text.rsplit(": ", 1)[-1].strip(" ')\"")[:120] or type(exc).__name__


def _stale_connection(exc: requests.exceptions.ConnectionError) -> bool:
    """urllib3 (https) picked a pooled connection that the peer had just closed: nothing
    was processed, so sending once more is safe. (HttpTransport retries this itself.)"""
    cause = exc.args[0] if exc.args else None
    if not isinstance(cause, ProtocolError) or len(cause.args) < 2:
        return False
    return isinstance(cause.args[1], (RemoteDisconnected, ConnectionResetError, BrokenPipeError))


@contextmanager
def mapped_errors(what: str) -> Iterator[None]:
    """Re-raises requests' exceptions as ours, naming ``what`` we were talking to."""
    try:
        yield
    except requests.exceptions.ConnectTimeout:
        raise ConnectTimedOut(f"Timed out connecting to {what}.") from None
    except requests.exceptions.Timeout:
        raise UpstreamTimeout(f"{what} did not answer in time.") from None
    except requests.exceptions.ChunkedEncodingError:
        raise UpstreamError(f"{what} closed the connection unexpectedly.") from None
    except requests.exceptions.ConnectionError as exc:
        cause = exc.args[0] if exc.args else None
        if isinstance(cause, ReadTimeoutError):  # requests wraps body read timeouts so
            raise UpstreamTimeout(f"{what} did not answer in time.") from None
        if isinstance(cause, ProtocolError):
            raise UpstreamError(f"{what} closed the connection unexpectedly.") from None
        raise WorkerUnreachable(f"Could not connect to {what} ({_reason(exc)}).") from None
    except requests.exceptions.RequestException as exc:
        raise UpstreamError(f"Error talking to {what}: {type(exc).__name__}.") from None

"""The pooled requests.Session for all backend traffic, and requests' errors mapped to ours.

requests' exceptions never leave app/upstream/: callers see WorkerUnreachable (could not
connect), UpstreamTimeout (no bytes within the read timeout) or UpstreamError (anything
else that went wrong on the wire).
"""
from __future__ import annotations

from contextlib import contextmanager
from http.client import RemoteDisconnected
from typing import Any, Iterator

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from app.errors import UpstreamError, UpstreamTimeout, WorkerUnreachable

USER_AGENT = "flaskchat"


def build_session(pool_size: int) -> requests.Session:
    """One Session per process: keep-alive pools sized for every open stream."""
    session = requests.Session()
    # Without this, every call scans the environment for proxies and .netrc (~0.25 ms).
    session.trust_env = False
    adapter = HTTPAdapter(pool_connections=16, pool_maxsize=pool_size, max_retries=0,
                          pool_block=False)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update({"User-Agent": USER_AGENT})
    return session


def post(session: requests.Session, url: str, **kwargs: Any) -> requests.Response:
    """``session.post``, sent once more if a pooled keep-alive connection turns out to have
    been closed by the peer (it idled out just as we picked it): nothing was processed."""
    try:
        return session.post(url, **kwargs)
    except requests.exceptions.ConnectionError as exc:
        if not _stale_connection(exc):
            raise
    return session.post(url, **kwargs)


def _stale_connection(exc: requests.exceptions.ConnectionError) -> bool:
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
        raise UpstreamTimeout(f"Timed out connecting to {what}.") from None
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
        raise WorkerUnreachable(f"Could not connect to {what}.") from None
    except requests.exceptions.RequestException as exc:
        raise UpstreamError(f"Error talking to {what}: {type(exc).__name__}.") from None

"""The text/event-stream Response: keep-alive comments while the events pause, and an
error event plus ``[DONE]`` instead of a cut connection when a stream fails.

Serving hands over an iterator of event bytes in which None means "nothing yet" (a tick
of an upstream's silence); a comment line goes out when nothing has for the keep-alive
interval, so that proxies and clients do not give up on a model that queues or reads a
long prompt.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Iterator

from flask import Flask, Response, current_app

from app.errors import APIError, ClientClosedRequest
from app.serving.events import DONE, error_event
from app.web.handlers import ServerErrorHook, failure_hook

log = logging.getLogger("flaskchat")

KEEPALIVE = b": keepalive\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
INTERVAL = "flaskchat.keepalive_interval"


def init_app(app: Flask, keepalive_interval: float) -> None:
    app.extensions[INTERVAL] = keepalive_interval


def response(events: Iterable[bytes | None],
             on_close: Iterable[Callable[[], object]] = (),
             failed: Callable[[APIError], bytes] | None = None) -> Response:
    """A text/event-stream Response; ``on_close`` runs when the client goes or the body ends,
    even if the body was never iterated. ``failed``: the last bytes of a stream that fails
    after its first byte (default: the error event and ``[DONE]``)."""
    interval: float = current_app.extensions.get(INTERVAL, 10.0)
    hook = failure_hook()
    # Not direct_passthrough: werkzeug would then hand the bare generator to the server,
    # and the call_on_close callbacks (which release the worker and the admission place)
    # would never run.
    resp = Response(_guarded(events, interval, hook, failed or _error_and_done),
                    mimetype="text/event-stream")
    resp.headers.update(HEADERS)
    for callback in on_close:
        resp.call_on_close(callback)
    return resp


def _error_and_done(error: APIError) -> bytes:
    return error_event(error) + DONE


def _guarded(events: Iterable[bytes | None], interval: float, hook: ServerErrorHook,
             failed: Callable[[APIError], bytes]) -> Iterator[bytes]:
    written = time.monotonic()
    try:
        for chunk in events:
            if chunk is None:
                if time.monotonic() - written < interval:
                    continue
                chunk = KEEPALIVE
            written = time.monotonic()
            yield chunk
    except ClientClosedRequest:
        return  # nobody is reading; closing the events closed the upstream
    except APIError as exc:
        log.warning("stream ended by %s: %s%s", type(exc).__name__, exc.message,
                    f" ({exc.internal})" if exc.internal else "")
        hook(exc)
        yield failed(exc)
    except Exception:
        log.exception("stream failed")
        yield failed(APIError("The server had an error while streaming the response."))

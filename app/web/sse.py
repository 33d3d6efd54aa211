"""Server-sent events: framing, the error event, and the streaming Response."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import orjson

from app.telemetry import metrics
from app.errors import APIError, envelope

if TYPE_CHECKING:
    from flask import Response

log = logging.getLogger("flaskchat")

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keepalive\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(payload: object) -> bytes:
    """One ``data:`` event. JSON never holds a raw newline, so one line always suffices."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def error_event(error: APIError) -> bytes:
    """The mid-stream error: the OpenAI envelope, which openai-python raises as APIError."""
    return event(envelope(error))


def response(events: Iterable[bytes], on_close: Iterable[Callable[[], object]] = (),
             headers: dict[str, str] | None = None) -> "Response":
    """A text/event-stream Response; ``on_close`` runs when the client goes or the body ends,
    even if the body was never iterated."""
    from flask import Response  # here: the serving layer uses this module's framing only

    # Not direct_passthrough: werkzeug would then hand the bare generator to the server,
    # and the call_on_close callbacks (which release the worker and the admission place)
    # would never run.
    resp = Response(_guarded(events), mimetype="text/event-stream")
    resp.headers.update(HEADERS)
    if headers:
        resp.headers.update(headers)
    for callback in on_close:
        resp.call_on_close(callback)
    return resp


def _guarded(events: Iterable[bytes]) -> Iterator[bytes]:
    """Ends any stream with an error event and [DONE] instead of a cut connection."""
    try:
        yield from events
    except APIError as exc:
        log.warning("stream ended by %s: %s", type(exc).__name__, exc.message)
        metrics.count_upstream_error(exc)
        yield error_event(exc)
        yield DONE
    except Exception:
        log.exception("stream failed")
        yield error_event(APIError("The server had an error while streaming the response."))
        yield DONE

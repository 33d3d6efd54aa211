"""Server-sent events as the OpenAI API frames them: ``data:`` events, the error event,
and ``[DONE]``. Bytes only; the streaming Response is ``app.web.sse``'s."""
from __future__ import annotations

import orjson

from app.errors import APIError, envelope

DONE = b"data: [DONE]\n\n"


def event(payload: object) -> bytes:
    """One ``data:`` event. JSON never holds a raw newline, so one line always suffices."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def error_event(error: APIError) -> bytes:
    """The mid-stream error: the OpenAI envelope, which openai-python raises as APIError."""
    return event(envelope(error))

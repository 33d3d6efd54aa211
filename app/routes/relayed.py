"""The response for a request whose model an OpenAI-compatible upstream serves."""
from __future__ import annotations

from typing import Any

from flask import Response

from app.serving import relay
from app.web import sse
from app.web.context import call, upstream
from app.web.json_io import json_response


def serves(model: str) -> bool:
    return upstream().openai.serves(model)


def relayed(path: str, payload: dict[str, Any], model: str, stream: bool,
            max_tokens: int | None = None, choices: int = 1) -> Response:
    """``max_tokens`` and ``choices``: as the (validated) request asks, for its key's
    limits."""
    if stream:
        events, on_close = relay.open_stream(path, payload, model, upstream(), call(),
                                             max_tokens, choices)
        return sse.response(events, on_close)
    return json_response(relay.complete(path, payload, model, upstream(), call(), max_tokens,
                                        choices))

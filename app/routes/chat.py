"""POST /v1/chat/completions and FastChat's POST /api/v1/chat/completions."""
from __future__ import annotations

from flask import Blueprint
from flask.typing import ResponseReturnValue
from marshmallow import Schema

from app.routes.relayed import relayed, serves
from app.serving import chat, relay
from app.web import sse
from app.web.admission import admit
from app.web.access import require_api_key
from app.web.context import call, schemas, upstream
from app.web.json_io import json_response, read_json_object
from app.web.validation import load
from schemas.sampling import generations

bp = Blueprint("chat", __name__)
bp.before_request(require_api_key)
bp.before_request(admit)


@bp.post("/v1/chat/completions")
def create_chat_completion() -> ResponseReturnValue:
    return _chat(schemas().chat)


@bp.post("/api/v1/chat/completions")
def create_api_chat_completion() -> ResponseReturnValue:
    return _chat(schemas().api_chat)


def _chat(schema: Schema) -> ResponseReturnValue:
    payload = read_json_object()
    body = load(schema, payload)
    if serves(body["model"]):
        return relayed(relay.CHAT, payload, body["model"], body["stream"], body["max_tokens"],
                       generations(body["n"], body["best_of"]))
    if body["stream"]:
        events, on_close = chat.open_stream(body, upstream(), call())
        return sse.response(events, on_close)
    return json_response(chat.complete(body, upstream(), call()))

"""POST /v1/completions."""
from __future__ import annotations

from flask import Blueprint
from flask.typing import ResponseReturnValue

from app.routes.relayed import relayed, serves
from app.serving import completions, relay
from app.web import sse
from app.web.admission import admit
from app.web.access import require_api_key
from app.web.context import call, schemas, upstream
from app.web.json_io import json_response, read_json_object
from app.web.validation import load
from schemas.sampling import generations

bp = Blueprint("completions", __name__)
bp.before_request(require_api_key)
bp.before_request(admit)


@bp.post("/v1/completions")
def create_completion() -> ResponseReturnValue:
    payload = read_json_object()
    body = load(schemas().completion, payload)
    if serves(body["model"]):
        return relayed(relay.COMPLETIONS, payload, body["model"], body["stream"],
                       body["max_tokens"],
                       generations(body["n"], body["best_of"]) * len(body["prompt"]))
    if body["stream"]:
        events, on_close = completions.open_stream(body, upstream(), call())
        return sse.response(events, on_close)
    return json_response(completions.complete(body, upstream(), call()))

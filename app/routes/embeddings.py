"""POST /v1/embeddings and POST /v1/engines/{model}/embeddings."""
from __future__ import annotations

from flask import Blueprint
from flask.typing import ResponseReturnValue

from app.routes.relayed import relayed, serves
from app.serving import relay
from app.serving.embeddings import embed
from app.web.admission import admit
from app.web.access import require_api_key
from app.web.context import call, schemas, upstream
from app.web.json_io import json_response, read_json_object
from app.web.validation import load

bp = Blueprint("embeddings", __name__)
bp.before_request(require_api_key)
bp.before_request(admit)


@bp.post("/v1/embeddings")
@bp.post("/v1/engines/<path:model_name>/embeddings")
def create_embeddings(model_name: str | None = None) -> ResponseReturnValue:
    payload = read_json_object()
    body = load(schemas().embedding, payload)
    model: str = body["model"] or model_name or ""
    if serves(model):
        return relayed(relay.EMBEDDINGS, {**payload, "model": model}, model, stream=False)
    return json_response(embed(body, model_name, upstream(), call()))

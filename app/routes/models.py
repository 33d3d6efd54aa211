"""GET /v1/models, GET /v1/models/{id} and FastChat's POST /api/v1/token_check."""
from __future__ import annotations

from flask import Blueprint
from flask.typing import ResponseReturnValue

from app.serving.models import list_models, retrieve_model
from app.serving.token_check import check_tokens
from app.web.admission import admit
from app.web.access import require_api_key
from app.web.context import call, schemas, upstream
from app.web.json_io import json_response, read_json_object
from app.web.validation import load

bp = Blueprint("models", __name__)
bp.before_request(require_api_key)


@bp.get("/v1/models")
def get_models() -> ResponseReturnValue:
    return json_response(list_models(upstream(), call()))


@bp.get("/v1/models/<path:model_id>")
def get_model(model_id: str) -> ResponseReturnValue:
    return json_response(retrieve_model(upstream(), call(), model_id))


@bp.post("/api/v1/token_check")
def token_check() -> ResponseReturnValue:
    admit()
    body = load(schemas().token_check, read_json_object())
    return json_response(check_tokens(body, upstream(), call()))

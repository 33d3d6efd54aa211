"""JSON in and out of Flask: the request body parser and the response builder (orjson)."""
from __future__ import annotations

from typing import Any

import orjson
from flask import Response, request

from app.errors import InvalidRequest, UnsupportedMediaType


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status=status, mimetype="application/json")


def read_json_object() -> dict[str, Any]:
    """The request body as a JSON object, or a 400/413/415 naming what is wrong."""
    mimetype = request.mimetype
    # A missing Content-Type is read as JSON (curl -d without -H); another type is refused.
    if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {mimetype!r}. "
            "With curl, add -H 'Content-Type: application/json'.")
    body = request.get_data(cache=True)
    if not body.strip():
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return payload

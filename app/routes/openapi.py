"""GET /openapi.json: the API description (no key needed)."""
from __future__ import annotations

from flask import Blueprint, current_app
from flask.typing import ResponseReturnValue

from app.web.context import schemas
from app.web.json_io import json_response
from app.web.openapi import build_spec

bp = Blueprint("openapi", __name__)
EXTENSION = "flaskchat.openapi"


@bp.get("/openapi.json")
def openapi_document() -> ResponseReturnValue:
    document = current_app.extensions.get(EXTENSION)
    if document is None:  # built on first use, once per process
        document = current_app.extensions[EXTENSION] = build_spec(schemas())
    return json_response(document)

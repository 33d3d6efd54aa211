"""GET /health (the process is up) and GET /ready (a model can be served). No auth."""
from __future__ import annotations

from flask import Blueprint
from flask.typing import ResponseReturnValue

from app.context import upstream
from app.errors import APIError, UpstreamUnavailable, error_response
from app.http_json import json_response

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> ResponseReturnValue:
    return json_response({"status": "ok"})


@bp.get("/ready")
def ready() -> ResponseReturnValue:
    """200 while some model is known, "degraded" if that list is stale because the
    controller cannot be reached; 503 when no model can be served."""
    controller = upstream().controller
    try:
        models = controller.directory().models
    except APIError as exc:
        # Returned, not raised: probes poll this, and the handler would log each one.
        return error_response(UpstreamUnavailable(f"Not ready: {exc.message}"))
    if not models:
        return error_response(UpstreamUnavailable("Not ready: no model worker is registered."))
    error = controller.status()["error"]
    return json_response({"status": "degraded" if error else "ready", "models": models,
                          "controller_error": error})

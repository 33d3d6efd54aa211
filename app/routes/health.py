"""GET /health (the process is up) and GET /ready (a model can be served). No auth."""
from __future__ import annotations

import gc
import os

from flask import Blueprint, request
from flask.typing import ResponseReturnValue

from app.admission import admission
from app.context import upstream
from app.errors import APIError, UpstreamUnavailable, error_response
from app.http_json import json_response

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> ResponseReturnValue:
    """The process is up. ``?verbose=1`` adds what a leak check needs (slower: it walks
    the garbage collector's objects)."""
    places = admission()
    body: dict[str, object] = {"status": "ok", "in_flight": places.in_flight,
                               "queued": places.queued}
    if request.args.get("verbose"):
        body["fds"] = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") \
            else None
        gc.collect()
        body["greenlets"] = sum(1 for o in gc.get_objects()
                                if type(o).__name__ in ("greenlet", "Greenlet"))
    return json_response(body)


@bp.get("/ready")
def ready() -> ResponseReturnValue:
    """200 while some model is known, "degraded" if that list is stale because the
    controller cannot be reached; 503 when no model can be served."""
    try:
        status = upstream().controller.status()
    except APIError as exc:
        # Returned, not raised: probes poll this, and the handler would log each one.
        return error_response(UpstreamUnavailable(f"Not ready: {exc.message}"))
    if not status["models"]:
        return error_response(UpstreamUnavailable("Not ready: no model worker is registered."))
    return json_response({"status": "degraded" if status["error"] else "ready",
                          "models": status["models"], "controller_error": status["error"]})

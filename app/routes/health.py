"""GET /health (the process is up: cheap, no key) and GET /ready (a model can be served:
no key, for load balancers). ``/health?verbose=1`` walks the garbage collector's objects,
which holds the event loop for as long (every open stream waits): it takes an admin key,
and is computed at most once a second per process."""
from __future__ import annotations

import gc
import os
import time
from collections import Counter

from flask import Blueprint, current_app, request
from flask.typing import ResponseReturnValue

from app.errors import APIError, ServerStopping, UpstreamUnavailable
from app.web.access import require_admin_key
from app.web.admission import admission
from app.web.context import upstream
from app.web.handlers import error_response
from app.web.lifecycle import lifecycle
from app.web.json_io import json_response

bp = Blueprint("health", __name__)
VERBOSE = "flaskchat.health_verbose"  # (when computed, what)
VERBOSE_EVERY = 1.0  # seconds a verbose answer is reused


@bp.get("/health")
def health() -> ResponseReturnValue:
    """The process is up. ``?verbose=1`` (admin key) adds what a leak check needs."""
    places = admission()
    body: dict[str, object] = {"status": "ok", "in_flight": places.in_flight,
                               "queued": places.queued}
    if request.args.get("verbose"):
        require_admin_key()
        body.update(_verbose())
    return json_response(body)


def _verbose() -> dict[str, object]:
    cached = current_app.extensions.get(VERBOSE)
    if cached is not None and time.monotonic() - cached[0] < VERBOSE_EVERY:
        found: dict[str, object] = cached[1]
        return found
    body: dict[str, object] = {}
    body["fds"] = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") \
        else None
    gc.collect()
    alive = [o for o in gc.get_objects() if type(o).__name__ in ("greenlet", "Greenlet")
             and getattr(o, "dead", True) is False]
    body["greenlets"] = len(alive)
    body["greenlets_waiting_in"] = dict(Counter(_where(g) for g in alive).most_common(8))
    # (app.runtime.collector: start-up's objects frozen)
    generations = gc.get_stats()
    body["collector"] = {"frozen_objects": gc.get_freeze_count(),
                         "threshold": list(gc.get_threshold()),
                         "collections": [stats["collections"] for stats in generations],
                         # cyclic garbage found, per generation: what refcounting missed
                         "collected": [stats["collected"] for stats in generations]}
    body["workers_probed"] = upstream().health.probing
    current_app.extensions[VERBOSE] = (time.monotonic(), body)
    return body


def _where(greenlet: object) -> str:
    """Where a greenlet waits: its innermost frame in flaskchat's code, else in any code."""
    frame = getattr(greenlet, "gr_frame", None)
    innermost = "?"
    while frame is not None:
        path = frame.f_code.co_filename
        name = f"{path.rsplit('/', 2)[-2]}/{path.rsplit('/', 1)[-1]}:{frame.f_code.co_name}"
        if "/app/" in path:
            return name
        if innermost == "?":
            innermost = name
        frame = frame.f_back
    return innermost


@bp.get("/ready")
def ready() -> ResponseReturnValue:
    """200 while some model is known, "degraded" if that list is stale because the
    controller cannot be reached; 503 when no model can be served, and 503 "draining" from
    the moment this process begins to stop. Models of OpenAI-compatible upstreams count
    while one of their servers is not marked failed. ``workers`` counts the workers this
    process knows for each model (flaskchat's controller; a stock one does not tell)."""
    if lifecycle().draining:
        # Returned, not raised: probes poll this, and the handler would log each one.
        return error_response(ServerStopping("Not ready: this process is draining (a stop "
                                             "or a reload has begun).", code="draining"))
    relayed = upstream().openai.healthy_models()
    try:
        status = upstream().controller.status()
    except APIError as exc:
        if not relayed:
            # Returned, not raised: probes poll this, and the handler would log each one.
            return error_response(UpstreamUnavailable(f"Not ready: {exc.message}"))
        status = {"models": [], "workers": {}, "error": exc.message}
    models = list(dict.fromkeys([*status["models"], *relayed]))
    if not models:
        return error_response(UpstreamUnavailable("Not ready: no model worker is registered."))
    return json_response({"status": "degraded" if status["error"] else "ready",
                          "models": models, "workers": status["workers"],
                          "controller_error": status["error"]})

"""The controller process: a FastChat-protocol worker registry behind a Flask app."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from flask import Flask

from app.config import ControllerSettings

log = logging.getLogger("flaskchat.controller")
STATUS_TIMEOUT = (5.0, 5.0)


def create_controller_app(settings: ControllerSettings | None = None) -> Flask:
    import requests

    from app.controller.registry import Registry
    from app.controller.routes import REGISTRY, SESSION, bp
    from app.telemetry import tracing
    from app.web import handlers
    from schemas.controller import WorkerStatusSchema

    settings = settings or ControllerSettings()
    # Its own spans only: registrations and refreshes are never part of a request's trace
    tracing.configure("controller", settings.otlp_traces_endpoint)
    # A few calls a minute (and FastChat's proxied generations): requests' own pool.
    session = requests.Session()
    session.trust_env = False
    status_schema = WorkerStatusSchema()

    def fetch_status(name: str) -> dict[str, Any] | None:
        try:
            response = session.post(name + "/worker_get_status", json={},
                                    timeout=STATUS_TIMEOUT)
            response.raise_for_status()
            loaded: dict[str, Any] = status_schema.load(response.json())
            return loaded
        except (requests.RequestException, ValueError) as exc:
            log.warning("worker %s status failed: %s", name, exc)
            return None

    registry = Registry(settings.dispatch_method, settings.heart_beat_expiration, fetch_status)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    app.config["WORKER_TIMEOUT"] = settings.worker_api_timeout
    app.config["WORKER_SECRET"] = settings.worker_secret.encode()
    app.extensions[REGISTRY] = registry
    app.extensions[SESSION] = session
    handlers.init_app(app)
    app.register_blueprint(bp)
    _start_sweeper(registry, interval=min(10.0, settings.heart_beat_expiration / 3))
    return app


def _start_sweeper(registry: Any, interval: float) -> None:
    def sweep() -> None:
        while True:
            time.sleep(interval)
            try:
                registry.remove_stale()
            except Exception:  # keep sweeping whatever happens
                log.exception("sweep failed")

    threading.Thread(target=sweep, name="heartbeat-sweeper", daemon=True).start()

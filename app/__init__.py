"""flaskchat: an OpenAI-compatible gateway for FastChat-protocol model workers."""
from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask

if TYPE_CHECKING:
    from app.config import Settings


def create_app(settings: "Settings | None" = None) -> Flask:
    import os

    from app import errors
    from app.config import Settings
    from app.demo import routes as demo
    from app.demo.tickets import TicketStore
    from app.routes import chat, completions, embeddings, health, metrics, models, openapi
    from app.runtime import state_dir
    from app.telemetry import access_log as observability
    from app.telemetry.logs import configure_logging
    from app.upstream import Upstream
    from app.web import admission, auth, cors, request_id
    from app.web.context import EXTENSION, SCHEMAS
    from schemas import RequestSchemas

    settings = settings or Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions[EXTENSION] = Upstream(settings)
    app.extensions[SCHEMAS] = RequestSchemas(
        max_n=settings.max_n, max_inputs=settings.max_inputs,
        max_messages=settings.max_messages, max_tokens_limit=settings.max_tokens_limit)
    request_id.init_app(app)
    observability.init_app(app, settings.access_log, settings.metrics)
    cors.init_app(app, settings)
    auth.init_app(app, settings.api_keys)
    admission.init_app(app, settings.max_in_flight, settings.max_queued,
                       settings.queue_timeout)
    errors.init_app(app)
    for module in (chat, completions, embeddings, models, health, openapi):
        app.register_blueprint(module.bp)
    if settings.metrics:
        app.register_blueprint(metrics.bp)
    if settings.demo:
        shared = (settings.state_dir or os.environ.get(state_dir.STATE_ENV)
                  or state_dir.private_dir())
        os.makedirs(state_dir.tickets_dir(shared), mode=0o700, exist_ok=True)
        app.extensions[demo.EXTENSION] = TicketStore(state_dir.tickets_dir(shared),
                                                     settings.demo_ticket_ttl)
        app.register_blueprint(demo.bp)
    return app

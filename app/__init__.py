"""flaskchat: an OpenAI-compatible gateway for FastChat-protocol model workers."""
from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask

if TYPE_CHECKING:
    from app.config import Settings


def create_app(settings: "Settings | None" = None) -> Flask:
    from app import admission, auth, cors, errors, request_id
    from app.config import Settings
    from app.context import EXTENSION, SCHEMAS
    from app.logs import configure_logging
    from app.routes import chat, completions, embeddings, health, models, openapi
    from app.upstream import Upstream
    from schemas import RequestSchemas

    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions[EXTENSION] = Upstream(settings)
    app.extensions[SCHEMAS] = RequestSchemas(
        max_n=settings.max_n, max_inputs=settings.max_inputs,
        max_messages=settings.max_messages, max_tokens_limit=settings.max_tokens_limit)
    request_id.init_app(app)
    cors.init_app(app, settings)
    auth.init_app(app, settings.api_keys)
    admission.init_app(app, settings.max_in_flight, settings.max_queued,
                       settings.queue_timeout)
    errors.init_app(app)
    for module in (chat, completions, embeddings, models, health, openapi):
        app.register_blueprint(module.bp)
    return app

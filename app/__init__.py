"""flaskchat: an OpenAI-compatible gateway for FastChat-protocol model workers."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from app.config import Settings
    from app.upstream.openai_config import Targets


def create_app(settings: "Settings | None" = None,
               upstream_targets: "Targets | None" = None) -> "Flask":
    """The gateway's Flask app. Its imports wait until here, so that ``import app`` (in
    gunicorn's arbiter, before the gevent worker patches) loads neither requests nor the
    rest of the stack. ``upstream_targets``: the OpenAI-compatible upstreams as the
    arbiter read and checked them (else they are read from the settings)."""
    from flask import Flask

    from app import admin, demo
    from app.access.service import open_access
    from app.config import Settings
    from app.responses.store import ResponseStore
    from app.routes import (admin_api, chat, completions, embeddings, health, metrics, models,
                            openapi, responses)
    from app.telemetry import tracing
    from app.telemetry.logs import configure_logging
    from app.telemetry.metrics import AccessMetrics, QueueMetrics, UpstreamFailures
    from app.upstream.clients import Upstream
    from app.web import (access, admission, calls, cors, handlers, lifecycle, request_end,
                         routing, sse)
    from app.web.context import SCHEMAS, UPSTREAM
    from schemas import RequestSchemas

    settings = settings or Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    if tracing.configure("gateway", settings.otlp_traces_endpoint) and settings.metrics:
        from app.telemetry.metrics import TRACE_SPANS_DROPPED
        tracing.on_dropped(TRACE_SPANS_DROPPED.inc)
    failures = UpstreamFailures()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    queues = QueueMetrics(settings.metrics_key_labels) if settings.metrics else None
    app.extensions[UPSTREAM] = Upstream(settings, failures, upstream_targets, queues)
    app.extensions[SCHEMAS] = RequestSchemas(
        max_n=settings.max_n, max_inputs=settings.max_inputs,
        max_messages=settings.max_messages, max_tokens_limit=settings.max_tokens_limit)
    lifecycle.init_app(app, settings.drain_seconds)
    calls.init_app(app)
    request_end.init_app(app, settings.access_log, settings.metrics)
    cors.init_app(app, settings)
    access_metrics = AccessMetrics(settings.metrics_key_labels) if settings.metrics else None
    keys_and_usage = open_access(settings, access_metrics)
    access.init_app(app, keys_and_usage, access_metrics)
    keys_and_usage.start()
    lifecycle.lifecycle_of(app).on_stop(keys_and_usage.stop)
    lifecycle.lifecycle_of(app).on_stop(app.extensions[UPSTREAM].slots.drain)
    admission.init_app(app, settings.max_in_flight, settings.max_queued,
                       settings.queue_timeout,
                       on_refused=access_metrics.refused if access_metrics else None)
    handlers.init_app(app, on_server_error=failures.failed)
    sse.init_app(app, settings.keepalive_interval)
    stored_responses = ResponseStore(keys_and_usage.engine, settings.responses_ttl,
                                     settings.responses_max, settings.responses_max_bytes,
                                     settings.responses_key_quota,
                                     settings.responses_key_max)
    app.extensions[responses.STORE] = stored_responses
    lifecycle.lifecycle_of(app).on_stop(stored_responses.stop)  # nothing saved is lost
    for module in (chat, completions, embeddings, responses, models, health, openapi,
                   admin_api):
        app.register_blueprint(module.bp)
    if settings.metrics:
        app.extensions[metrics.ADMIN_ONLY] = settings.metrics_require_admin
        app.register_blueprint(metrics.bp)
    admin.init_app(app)
    if settings.demo:
        demo.init_app(app, settings)
    routing.remember_fixed_paths(app)
    return app

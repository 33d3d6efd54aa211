"""The model worker process: one model (chat or embeddings) behind FastChat's protocol."""
from __future__ import annotations

import logging
import time

from flask import Flask

from app.config import WorkerSettings

log = logging.getLogger("flaskchat.worker")


def create_worker_app(settings: WorkerSettings, register: bool = True) -> Flask:
    from app.telemetry import tracing
    from app.web import handlers, routing
    from app.worker import loading, registration
    from app.worker.routes import STATE, WorkerState, bp
    from app.worker.slots import Slots

    tracing.configure("worker", settings.otlp_traces_endpoint)
    source = loading.resolve(settings.model_path)
    names = list(settings.model_names) or [source.name]
    started = time.monotonic()
    log.info("loading %s from %s%s", names[0], source.folder,
             f" ({source.gguf_file})" if source.gguf_file else "")
    if source.is_embedding:
        from app.worker.embedding_engines import load_engine
        from app.worker.embedding_model import EmbeddingModel
        engine, tokenizer, config = load_engine(source, settings)
        embedder = EmbeddingModel(engine, tokenizer, source.folder, config)
        state = WorkerState(settings, names, Slots(settings.concurrency(engine.name)),
                            embedder=embedder)
        detail = f"embeddings, {engine.name} engine: {engine.summary}, " \
            f"{embedder.dimensions} dimensions, window {embedder.max_seq_length} tokens"
    else:
        from app.worker.engines import load_chat_model
        chat = load_chat_model(source, settings)
        state = WorkerState(settings, names, Slots(settings.concurrency(chat.engine.name)),
                            chat=chat)
        prompts = "own chat template" if chat.has_chat_template \
            else f"template {chat.conv['name']}"
        defaults = ", ".join(f"{k} {v}" for k, v in chat.sampling_defaults.items())
        detail = f"{chat.engine.name} engine: {chat.engine.summary}, context " \
            f"{chat.context_length} tokens, {prompts}, when unset: {defaults}"
    log.info("loaded %s in %.1f s: %s; %d generations at once", names[0],
             time.monotonic() - started, detail, state.slots.limit)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024 * 1024
    app.extensions[STATE] = state
    handlers.init_app(app)
    app.register_blueprint(bp)
    routing.remember_fixed_paths(app)  # (the worker serves a few fixed paths)
    if register and not settings.no_register:
        registration.start(settings, state.status)
    return app

"""The model worker process: one model (chat or embeddings) behind FastChat's protocol."""
from __future__ import annotations

import logging
import time

from flask import Flask

from app.config import WorkerSettings

log = logging.getLogger("flaskchat.worker")


def create_worker_app(settings: WorkerSettings, register: bool = True) -> Flask:
    from app.web import handlers
    from app.worker import loading, registration
    from app.worker.routes import STATE, WorkerState, bp
    from app.worker.slots import Slots

    source = loading.resolve(settings.model_path)
    names = list(settings.model_names) or [source.name]
    state = WorkerState(settings, names, Slots(settings.limit_worker_concurrency))
    started = time.monotonic()
    log.info("loading %s from %s%s", names[0], source.folder,
             f" ({source.gguf_file})" if source.gguf_file else "")
    if source.is_embedding:
        from app.worker.embedding_model import EmbeddingModel
        model, tokenizer = loading.load_embedding_model(source, settings.device)
        state.embedder = EmbeddingModel(model, tokenizer, source.folder)
        params = sum(p.numel() for p in model.parameters())
        detail = f"embeddings, {params / 1e6:.0f}M parameters, window " \
            f"{state.embedder.max_seq_length} tokens"
    else:
        from app.worker.engines import load_chat_model
        state.chat = load_chat_model(source, settings)
        prompts = "own chat template" if state.chat.has_chat_template \
            else f"template {state.chat.conv['name']}"
        defaults = ", ".join(f"{k} {v}" for k, v in state.chat.sampling_defaults.items())
        detail = f"{state.chat.engine.name} engine: {state.chat.engine.summary}, context " \
            f"{state.chat.context_length} tokens, {prompts}, when unset: {defaults}"
    log.info("loaded %s in %.1f s: %s", names[0], time.monotonic() - started, detail)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024 * 1024
    app.extensions[STATE] = state
    handlers.init_app(app)
    app.register_blueprint(bp)
    if register and not settings.no_register:
        registration.start(settings, state.status)
    return app

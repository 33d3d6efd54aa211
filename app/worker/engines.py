"""Choosing and loading the engine a chat model runs on (--engine)."""
from __future__ import annotations

import logging
from pathlib import Path

from app.config import WorkerSettings
from app.worker import loading
from app.worker.chat_model import ChatModel, Engine

log = logging.getLogger("flaskchat.worker")


def load_chat_model(source: loading.ModelSource, settings: WorkerSettings) -> ChatModel:
    folder = loading.transformers_folder(source)
    engine = _engine(folder, settings)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return ChatModel(engine, tokenizer, settings.conv_template, settings.stream_interval,
                     loading.sampling_defaults(source, folder))


def _engine(folder: Path, settings: WorkerSettings) -> Engine:
    wanted = settings.engine
    if wanted == "auto":
        wanted = "onnx" if settings.device == "cpu" else "transformers"
    if wanted == "onnx":
        try:
            return _onnx(folder, settings)
        except loading.LoadError as exc:
            if settings.engine == "onnx":
                raise
            log.warning("%s; using the transformers engine", exc)
    model, _ = loading.load_folder(folder, settings.device, settings.dtype)
    from app.worker.torch_engine import TransformersEngine

    return TransformersEngine(model)


def _onnx(folder: Path, settings: WorkerSettings) -> Engine:
    if settings.device != "cpu":
        raise loading.LoadError("The onnx engine runs on the CPU; use --engine transformers "
                                f"for --device {settings.device}")
    from transformers import AutoConfig, GenerationConfig

    from app.worker.onnx_engine import OnnxEngine
    from app.worker.onnx_export import exported

    export = exported(folder)
    config = AutoConfig.from_pretrained(folder)
    try:
        generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json
        generation_config = None
    return OnnxEngine(export, config, generation_config, settings.concurrency("onnx"),
                      settings.max_context, settings.prefix_cache_mib)

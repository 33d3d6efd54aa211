"""The onnx engine: the model exported to ONNX with int4 weights (app.worker.onnx_export),
run by onnxruntime with continuous batching (app.worker.batching) on a key-value cache of one
row per slot (app.worker.onnx_decoder). Chosen over CTranslate2 by measurement on this
machine: see bench/RESULTS.md, issue 16."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator

from app.worker.batching import Batcher
from app.worker.chat_model import context_length
from app.worker.generation import Generation
from app.worker.loading import LoadError
from app.worker.onnx_decoder import OnnxDecoder
from app.worker.prefix_cache import PrefixCache


class OnnxEngine:
    name = "onnx"

    def __init__(self, export: Path, config: Any, generation_config: Any, slots: int,
                 max_context: int, prefix_cache_mib: int = 64) -> None:
        self.config = config
        self.generation_config = generation_config
        # the cache holds max_context tokens per slot (calloc'd: only used pages count)
        self.context_length = min(context_length(config), max_context)
        head_dim = getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        self.decoder = OnnxDecoder(export, slots, self.context_length, head_dim)
        try:  # a first step now: a graph onnxruntime cannot run fails here, not on a request
            self.decoder.prefill(0, [0])
        except Exception as exc:
            raise LoadError(f"onnxruntime cannot run the export of this model (use --engine "
                            f"transformers): {exc}") from exc
        finally:
            self.decoder.free(0)
        import onnxruntime

        weights = sum(f.stat().st_size for f in export.glob("model.onnx*")) / 2**20
        self.summary = f"onnxruntime {onnxruntime.__version__}, int4 weights " \
            f"({weights:.0f} MiB), batches of up to {slots}"
        self.batcher = Batcher(self.decoder, PrefixCache(prefix_cache_mib * 2**20))

    def generate(self, generation: Generation,
                 cancel: threading.Event) -> Iterator[dict[str, Any]]:
        return self.batcher.generate(generation, cancel)

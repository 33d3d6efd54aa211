"""What computes an embedding model's token vectors (``--engine``): onnxruntime on a graph
exported once (the default on a CPU), or PyTorch (any device; the fallback for a model
that does not export).

The export (torch.onnx.export of the transformer, then onnxruntime's transformer
optimizer: fused attention, SkipLayerNormalization, GELU) is cached under
~/.cache/flaskchat/onnx-embeddings, keyed by the folder and its files; the choices are
measured in bench/embedding_precision.py (bench/RESULTS.md, issue 26).
"""
from __future__ import annotations

import inspect
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from app.config import WorkerSettings
from app.worker import loading
from app.worker.onnx_export import fingerprint

log = logging.getLogger("flaskchat.worker")

GRAPH = "model.onnx"
FORMAT = "v1"  # bumped when the export changes (a new cache entry)
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class TorchEmbeddingEngine:
    name = "transformers"

    def __init__(self, model: Any) -> None:
        import torch

        self._torch = torch
        self.model = model
        self.device = next(model.parameters()).device
        self.takes_token_types = "token_type_ids" in inspect.signature(model.forward).parameters
        parameters = sum(p.numel() for p in model.parameters())
        self.summary = f"PyTorch, {parameters / 1e6:.0f}M parameters"

    def hidden_states(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            batch = {k: torch.from_numpy(v).to(self.device) for k, v in inputs.items()}
            hidden = self.model(**batch).last_hidden_state
            result: np.ndarray = hidden.float().cpu().numpy()
            return result


class OnnxEmbeddingEngine:
    name = "onnx"

    def __init__(self, export: Path, threads: int = 0) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(export / GRAPH), options,
                                                    providers=["CPUExecutionProvider"])
        names = {i.name for i in self.session.get_inputs()}
        self.takes_token_types = "token_type_ids" in names
        size = (export / GRAPH).stat().st_size / 2**20
        self.summary = f"onnxruntime {onnxruntime.__version__}, fused graph, float32 " \
            f"({size:.0f} MiB)"

    def hidden_states(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        result: np.ndarray = self.session.run(None, inputs)[0]
        return result


def load_engine(source: loading.ModelSource, settings: WorkerSettings) -> tuple[Any, Any, Any]:
    """(engine, tokenizer, config) for the embedding model, on the engine --engine asks
    for: ``auto`` is onnx on a CPU, falling back to PyTorch (with a log line) for a model
    that does not export."""
    model, tokenizer = loading.load_embedding_model(source, settings.device)
    wanted = settings.engine
    if wanted == "auto":
        wanted = "onnx" if settings.device == "cpu" else "transformers"
    if wanted == "onnx":
        try:
            return OnnxEmbeddingEngine(exported(source, model, tokenizer)), \
                tokenizer, model.config
        except loading.LoadError as exc:
            if settings.engine == "onnx":
                raise
            log.warning("%s; using the transformers engine", exc)
    return TorchEmbeddingEngine(model), tokenizer, model.config


def exported(source: loading.ModelSource, model: Any, tokenizer: Any) -> Path:
    """The model's optimized ONNX export, made the first time (a LoadError if it cannot
    be: the caller may fall back to PyTorch)."""
    folder = source.folder
    target = loading.cache_dir() / "onnx-embeddings" / \
        f"{source.name}-{FORMAT}-{fingerprint(folder)}"
    if (target / GRAPH).exists():
        return target
    log.info("exporting %s to ONNX for the onnx engine (once; later starts load the export "
             "at once)", folder)
    started = time.monotonic()
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _export(model, tokenizer, partial / "raw.onnx")
        _optimize(model.config, partial / "raw.onnx", partial / GRAPH)
        (partial / "raw.onnx").unlink()
        _check(partial / GRAPH, model, tokenizer)
    except Exception as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise loading.LoadError(f"Could not export {folder} to ONNX (use --engine "
                                f"transformers for this model): {exc}") from exc
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    log.info("exported in %.1f s into %s", time.monotonic() - started, target)
    return target


def _export(model: Any, tokenizer: Any, path: Path) -> None:
    import torch

    names = [n for n in INPUTS if n in inspect.signature(model.forward).parameters]

    class Hidden(torch.nn.Module):  # last_hidden_state only (BERT's pooler is not used)
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: Any) -> Any:
            return self.model(**dict(zip(names, args))).last_hidden_state

    sample = tokenizer(["a short one", "a longer sentence, so that the other is padded"],
                       padding=True, return_tensors="pt")
    axes = {name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's tracer warnings
        torch.onnx.export(Hidden().eval(), tuple(sample[n] for n in names), str(path),
                          input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes=axes, dynamo=False)


def _optimize(config: Any, source: Path, target: Path) -> None:
    """onnxruntime's transformer optimizer: attention, LayerNorm and GELU fused."""
    from onnxruntime.transformers.optimizer import optimize_model

    for name in ("fusion_base", "fusion_utils", "onnx_model", "onnx_model_bert"):
        logging.getLogger(name).setLevel(logging.WARNING)  # a line per fused node
    kind = config.model_type if config.model_type in ("bert", "bart", "gpt2", "t5") \
        else "bert"
    optimized = optimize_model(str(source), model_type=kind,
                               num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size, opt_level=1, use_gpu=False)
    optimized.save_model_to_file(str(target))


def _check(path: Path, model: Any, tokenizer: Any) -> None:
    """The export gives PyTorch's vectors (a graph that runs but computes something else
    would be worse than no export)."""
    import torch

    engine = OnnxEmbeddingEngine(path.parent, threads=1)
    texts = ["Hello world.", "A somewhat longer sentence about the weather in Paris today."]
    batch = tokenizer(texts, padding=True, return_tensors="np")
    inputs = {k: v.astype(np.int64) for k, v in batch.items()
              if k in ("input_ids", "attention_mask") or
              (k == "token_type_ids" and engine.takes_token_types)}
    got = engine.hidden_states(inputs)
    with torch.inference_mode():
        want = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}
                     ).last_hidden_state.float().numpy()
    mask = inputs["attention_mask"][:, :, None] > 0
    if not np.allclose(np.where(mask, got, 0), np.where(mask, want, 0), atol=2e-3):
        raise ValueError("the exported graph does not give the model's vectors")

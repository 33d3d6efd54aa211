"""What computes an embedding model's token vectors (``--engine``): onnxruntime on a graph
exported once (the default on a CPU), or PyTorch (any device; the fallback for a model
that does not export).

The export (torch.onnx.export of the transformer with its plain attention, then
onnxruntime's transformer optimizer: fused attention, SkipLayerNormalization, GELU; then
8-bit MatMul weights if they pass the quality gate against PyTorch's vectors) is cached
under ~/.cache/flaskchat/onnx-embeddings, keyed by the folder and its files; the choices
are measured in bench/embedding_precision.py (bench/RESULTS.md, issue 26).
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
from app.worker.embedding_model import pooled
from app.worker.onnx_export import export_lock, fingerprint

log = logging.getLogger("flaskchat.worker")

GRAPH = "model.onnx"
PRECISION = "precision.txt"  # beside the graph: what its weights are
FORMAT = "v2"  # bumped when the export changes (a new cache entry)
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# The MatMuls' weights (feed-forward and attention output) in 8 bits, a scale per block of
# 128, activations quantized per block at run time (onnxruntime's MatMulNBits, accuracy
# level 4): 1.3-2x float32's sentences/s with every probe vector at cosine >= 0.997 to
# PyTorch's, where whole-tensor int8 (quantize_dynamic) falls to 0.86. Measured in
# bench/embedding_precision.py; QUALITY_GATE is checked on every export.
WEIGHT_BITS, WEIGHT_BLOCK = 8, 128
QUALITY_GATE = 0.99  # the smallest cosine to PyTorch's vectors on the probe texts
PROBE_TEXTS = [
    "Hello world.", "A somewhat longer sentence about the weather in Paris today.",
    "x", " ", "!", "Ceci est une phrase en français, avec des accents : éàüç.",
    "这是一个中文句子，用来检查非ASCII文本。", "Emoji too 🙂🚀 and numbers 3.14159 2026-12-07",
    "How do I reset my password on the intranet?",
    "word " * 400,  # past the window: truncated
]


class TorchEmbeddingEngine:
    name = "transformers"

    def __init__(self, model: Any) -> None:
        import torch

        self._torch = torch
        self.model = model
        self.device = next(model.parameters()).device
        self.takes_token_types = "token_type_ids" in inspect.signature(model.forward).parameters
        self.runners = 1  # one forward at a time: PyTorch spreads each over the cores
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

    def __init__(self, export: Path, runners: int = 0) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Each run on the thread that calls it, one run per core at a time (the batcher's
        # runners): measured faster than each run spread over the cores once the gateway
        # shares the machine, and no thread pool spinning between runs.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.runners = runners or len(os.sched_getaffinity(0))
        self.session = onnxruntime.InferenceSession(str(export / GRAPH), options,
                                                    providers=["CPUExecutionProvider"])
        names = {i.name for i in self.session.get_inputs()}
        self.takes_token_types = "token_type_ids" in names
        size = (export / GRAPH).stat().st_size / 2**20
        precision = (export / PRECISION).read_text().strip() \
            if (export / PRECISION).exists() else "float32"
        self.summary = f"onnxruntime {onnxruntime.__version__}, fused graph, {precision} " \
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
    with export_lock(target):  # one process exports; the others then load its result
        if (target / GRAPH).exists():
            return target
        return _exported(source, model, tokenizer, target)


def _exported(source: loading.ModelSource, model: Any, tokenizer: Any, target: Path) -> Path:
    folder = source.folder
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
        reference = _reference(model, tokenizer)
        worst = _worst_cosine(partial, tokenizer, reference)
        if worst < 0.9999:  # float32 gives PyTorch's vectors, or the export is wrong
            raise ValueError(f"the exported graph does not give the model's vectors "
                             f"(cosine {worst:.4f})")
        _quantize_weights(partial, tokenizer, reference)
    except Exception as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise loading.LoadError(f"Could not export {folder} to ONNX (use --engine "
                                f"transformers for this model): {exc}") from exc
    shutil.rmtree(target, ignore_errors=True)  # an incomplete one (no graph)
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
    # Traced with the plain ("eager") attention: the optimizer recognizes its pattern and
    # fuses it into one Attention node; SDPA's traced graph does not fuse.
    attention = getattr(model.config, "_attn_implementation", None)
    switch = getattr(model, "set_attn_implementation", None)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's tracer warnings
        try:
            if switch is not None and attention not in (None, "eager"):
                switch("eager")
            torch.onnx.export(Hidden().eval(), tuple(sample[n] for n in names), str(path),
                              input_names=names, output_names=["last_hidden_state"],
                              dynamic_axes=axes, dynamo=False)
        finally:
            if switch is not None and attention not in (None, "eager"):
                switch(attention)


def _optimize(config: Any, source: Path, target: Path) -> None:
    """onnxruntime's transformer optimizer: attention, LayerNorm and GELU fused."""
    from onnxruntime.transformers.optimizer import optimize_model

    for name in ("fusion_base", "fusion_utils", "onnx_model", "onnx_model_bert"):
        logging.getLogger(name).setLevel(logging.WARNING)  # a line per fused node
    kind = config.model_type if config.model_type in ("bert", "bart", "gpt2", "t5") \
        else "bert"
    optimized = optimize_model(str(source), model_type=kind,
                               num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size, opt_level=2, use_gpu=False)
    optimized.save_model_to_file(str(target))


def _quantize_weights(folder: Path, tokenizer: Any, reference: np.ndarray) -> None:
    """The graph with 8-bit MatMul weights, kept only if it passes the quality gate (a
    model whose vectors it bends keeps float32, with a log line)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(
        logging.WARNING)  # two lines per MatMul
    float32 = folder / GRAPH
    quantized = folder / "quantized.onnx"
    try:
        quantizer = MatMulNBitsQuantizer(onnx.load(str(float32)), bits=WEIGHT_BITS,
                                         block_size=WEIGHT_BLOCK, is_symmetric=True,
                                         accuracy_level=4)
        quantizer.process()
        quantizer.model.save_model_to_file(str(quantized), use_external_data_format=False)
    except Exception as exc:  # noqa: BLE001 - e.g. an onnxruntime without 8-bit MatMulNBits
        quantized.unlink(missing_ok=True)
        (folder / PRECISION).write_text("float32\n")
        log.warning("could not quantize the weights to 8 bits (%s): keeping float32", exc)
        return
    float32.rename(folder / "float32.onnx")
    quantized.rename(float32)
    try:
        worst = _worst_cosine(folder, tokenizer, reference)
    except Exception as exc:  # noqa: BLE001 - a runtime without the 8-bit kernel
        log.warning("the 8-bit graph does not run here (%s): keeping float32", exc)
        worst = -1.0
    if worst >= QUALITY_GATE:
        (folder / "float32.onnx").unlink()
        (folder / PRECISION).write_text(f"int8 weights (block {WEIGHT_BLOCK})\n")
        log.info("8-bit weights keep the vectors (smallest cosine to PyTorch %.4f)", worst)
    else:
        (folder / "float32.onnx").replace(float32)
        (folder / PRECISION).write_text("float32\n")
        if worst >= 0:
            log.warning("8-bit weights bend this model's vectors (cosine %.4f < %s): "
                        "keeping float32", worst, QUALITY_GATE)


def _probe_inputs(tokenizer: Any, takes_token_types: bool) -> dict[str, np.ndarray]:
    batch = tokenizer(PROBE_TEXTS, padding=True, truncation=True, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in batch.items()
            if k in ("input_ids", "attention_mask") or
            (k == "token_type_ids" and takes_token_types)}


def _mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over the real tokens, normalized, whatever the model's own pooling: a wrong
    token vector shows in the mean too."""
    return pooled(hidden, mask, "mean", normalize=True)


def _reference(model: Any, tokenizer: Any) -> np.ndarray:
    import torch

    takes = "token_type_ids" in inspect.signature(model.forward).parameters
    inputs = _probe_inputs(tokenizer, takes)
    with torch.inference_mode():
        hidden = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}
                       ).last_hidden_state.float().numpy()
    return _mean_pooled(hidden, inputs["attention_mask"])


def _worst_cosine(folder: Path, tokenizer: Any, reference: np.ndarray) -> float:
    """The smallest cosine between the graph's probe vectors and PyTorch's, each text
    embedded in one padded batch."""
    engine = OnnxEmbeddingEngine(folder, runners=1)
    inputs = _probe_inputs(tokenizer, engine.takes_token_types)
    got = _mean_pooled(engine.hidden_states(inputs), inputs["attention_mask"])
    return float((got * reference).sum(axis=1).min())

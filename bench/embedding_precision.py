"""all-MiniLM-L6-v2 on onnxruntime: which export, graph optimization and precision embed
fastest while keeping the vectors (issue 26).

    python bench/embedding_precision.py [--threads 2 1] [--budget 3] [--no-search]
    python bench/embedding_precision.py --shipped   # the gate on the worker's own export

The model is the worker's embedded all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, 384 dims,
mean pooling + L2 normalize, a 256-token window). The reference is the worker's float32
PyTorch path (app/worker/embedding_model.py before issue 26, re-implemented in ``Bench``).
The script prints markdown tables for:

1. Export: torch.onnx.export of the AutoModel (input_ids, attention_mask, token_type_ids;
   dynamic batch and sequence axes), the legacy TorchScript exporter against the dynamo
   one (when onnxscript is installed), the attention as exported by transformers' "sdpa" and
   "eager" implementations, and a graph with the mean pooling and the L2 normalize inside
   (it outputs the sentence vectors): export time, file size, opset, warnings.
2. Graph optimizations: onnxruntime.transformers.optimizer.optimize_model(model_type="bert")
   with its fused attention, LayerNorm and GELU (opt_level 1 and 2, use_gpu=False), saved
   as a file, on each export; onnxruntime's session levels (disabled / basic / extended /
   all) on the plain export and on the optimized one.
3. Precision: float32, float16, dynamic int8 (quantize_dynamic: per channel or not, reduce
   range, QInt8 / QUInt8 weights, node groups left in float32), MatMulNBits 8/4-bit weights
   (accuracy level 4: activations quantized per block), static int8 (QDQ, calibrated on
   made-up sentences). Unless --no-search: which node groups break int8, each group
   quantized alone, then groups left in float32, the worst first, until the gate holds.
4. Speed: sentences/s, one short query per call and batches of 32 mixed-length texts, with
   intra_op_num_threads 2 and 1, against PyTorch (torch.set_num_threads the same); what
   sorting a request by length (to cut padding) buys; pooling in the graph or in numpy.
5. Tokenization (the fast tokenizer, numpy outputs) and numpy pooling costs.

The quality gate (``Gate``): on a fixed probe set (short sentences, a text far longer than
the window, French, Chinese, emoji, one character, a lone space...) embedded both as one
padded batch and one by one, and on a retrieval set (10 queries x 30 documents, 3 written
for each query), every vector keeps cosine >= 0.99 with the reference; for every query the
nearest document is the reference's; and the reference's 5 nearest keep their order, up to
ties: no document of the reference's top 5 falls behind one that the reference scores more
than TIE (0.01) lower. The exact top-5 order is shown too, but not required: the reference
has unrelated documents at ranks 5-6 within 0.004 of each other, which int8 errors of
cosine ~0.998 already reorder. Beside the gate, "held-out": the min cosine
on texts that the greedy search never sees (17 tiny inputs such as "no" or "!", alone, and
128 mixed texts), since a search tuned on the probes can overfit them (it does).

Speed excludes tokenization (section 5 gives it) and includes pooling. Artifacts go to
~/.cache/flaskchat/bench/embedding (or under $FLASKCHAT_CACHE_DIR), never the repo; every
run exports them again. Not a test: the numbers depend on the machine; run it on an idle one.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from app.worker import loading  # noqa: E402

MIN_COSINE = 0.99
TOP = 5
TIE = 0.01  # reference scores closer than this are a tie in the top-5 check

# --- texts ------------------------------------------------------------------------------

TOPICS = [  # (query, three documents about it)
    ("How can I reset my forgotten password?", [
        "To reset your password, click 'Forgot password' on the login page and follow the "
        "link we email you.",
        "Password reset links expire after 24 hours; request a new one if yours no longer "
        "works.",
        "Two-factor authentication adds a second step after you enter your password."]),
    ("How do I bake bread at home?", [
        "Mix flour, water, yeast and salt, knead the dough, let it rise, then bake it at "
        "220 degrees.",
        "Sourdough bread uses a fermented starter instead of commercial yeast.",
        "A hot oven and a tray of water give homemade loaves a crisp crust."]),
    ("Which planet is the largest in our solar system?", [
        "Jupiter is the largest planet in the solar system, more than eleven times as wide "
        "as Earth.",
        "Saturn is famous for its bright rings made of ice and rock.",
        "Mars is a cold desert planet with the tallest known volcano, Olympus Mons."]),
    ("How do I sort a list in Python?", [
        "Use sorted(items) to get a new sorted list, or items.sort() to sort it in place.",
        "Python lists are ordered, mutable sequences that can hold items of any type.",
        "The key argument of sort orders items by a computed value, such as their length."]),
    ("How often should I walk my dog?", [
        "Most dogs need at least two walks a day, thirty minutes or more each.",
        "Puppies need short, frequent outings and plenty of sleep.",
        "Brush your dog's coat every week to reduce shedding."]),
    ("What causes global warming?", [
        "Burning coal, oil and gas releases carbon dioxide that traps heat in the "
        "atmosphere.",
        "Cutting down forests reduces the number of trees that absorb carbon dioxide.",
        "Rising sea levels threaten coastal cities around the world."]),
    ("Who won the football World Cup in 2018?", [
        "France won the 2018 FIFA World Cup, beating Croatia 4-2 in the final in Moscow.",
        "The World Cup is held every four years and brings together national teams from "
        "every continent.",
        "Brazil has won the World Cup five times, more than any other country."]),
    ("Does coffee keep you awake?", [
        "Caffeine blocks adenosine receptors in the brain, which makes you feel less sleepy.",
        "Espresso is made by forcing hot water through finely ground coffee beans.",
        "Drinking coffee late in the afternoon can make it harder to fall asleep."]),
    ("How do I start investing in stocks?", [
        "Open a brokerage account, deposit money, and buy shares or low-cost index funds.",
        "Index funds spread your money across many companies to reduce risk.",
        "Share prices rise and fall with company earnings and market sentiment."]),
    ("How many hours of sleep does an adult need?", [
        "Adults generally need seven to nine hours of sleep per night.",
        "Going to bed at the same time every night improves the quality of sleep.",
        "Naps longer than thirty minutes can leave you groggy."]),
]
QUERIES = [query for query, _ in TOPICS]
DOCUMENTS = [doc for _, docs in TOPICS for doc in docs]

PROBES = {
    "short query": "reset password",
    "sentence": "The quick brown fox jumps over the lazy dog.",
    "paragraph": " ".join(DOCUMENTS[:6]),
    "far past the window": " ".join(DOCUMENTS * 2),  # ~900 tokens, truncated to 256
    "French": "Où se trouve la gare la plus proche ? Je dois prendre le train de 18 h "
              "pour Lyon, c'est très pressé.",
    "Chinese": "今天天气很好，我们一起去公园散步吧。",
    "emoji": "Best pizza ever 🍕🔥😍 would order again 👍",
    "mixed scripts": "Zürich, Ελληνικά, русский текст, 日本語, naïve café — ½ € ™",
    "single character": "a",
    "single symbol": "?",
    "a space": " ",
    "numbers": "3.14159 2.71828 1.41421 42 1e-9",
    "code": "def square(x): return x ** 2  # the square of x",
    "repeated word": "buffalo " * 40,
}


SIZES = [1, 2, 1, 4, 1, 8, 1, 3, 1, 13, 1, 2, 1, 6, 1, 10]  # documents per text


def mixed_texts(count: int = 128) -> list[str]:
    """Texts of mixed lengths in a fixed order: half one document (~15-25 tokens), the
    rest 2 to 13 documents (up to ~250 tokens); ~70 tokens on average."""
    texts = []
    for i in range(count):
        size = SIZES[i % len(SIZES)]
        start = (i * 11) % len(DOCUMENTS)
        texts.append(" ".join((DOCUMENTS * 2)[start:start + size]))
    return texts


# not used by the search: tiny inputs (3-4 tokens, where int8 errors do not average out)
TINY = ["hello", "x", "42", "…", "🙂", "é", "the", "OK", "!", "no", "Paris", "ça va ?", "你好",
        "-", "   ", "a b", "yes!!"]


def calibration_texts() -> list[str]:
    """A few hundred made-up sentences for static quantization (not the probe texts)."""
    subjects = ["The engineer", "My neighbour", "A small company", "The new student",
                "Our team", "The old librarian", "A tourist", "The city council"]
    verbs = ["explained", "discovered", "forgot", "described", "ordered", "repaired",
             "questioned", "published"]
    objects = ["the annual budget", "a broken bicycle", "the history of tea",
               "an unusual recipe", "the train timetable", "a long report about rivers",
               "the rules of chess", "a strange noise in the attic", "the price of housing",
               "a poem about winter"]
    texts = [f"{s} {v} {o}." for s in subjects for v in verbs for o in objects]
    return texts[::2] + [" ".join(texts[i:i + 12]) for i in range(0, 240, 12)]


# --- the reference and the runners --------------------------------------------------------


def pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over the unmasked tokens, then L2 normalize (numpy, float32)."""
    weights = mask.astype(np.float32)
    summed = np.matmul(weights[:, None, :], hidden)[:, 0]
    vectors = summed / np.maximum(weights.sum(axis=1, keepdims=True), 1e-9)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def normalized(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


class Bench:
    """The model, its tokenizer, and the reference: the worker's PyTorch path as it was
    before issue 26 (app/worker/embedding_model.py at 92fba51): the fast tokenizer
    (padding, truncation to the window), AutoModel's last_hidden_state in float32, mean
    pooling over the attention mask, L2 normalize. Re-implemented here so that the
    reference does not move while the worker's code does."""

    def __init__(self) -> None:
        import torch

        source = loading.resolve("all-minilm-l6-v2")
        self.folder = source.folder
        self.model, self.tokenizer = loading.load_embedding_model(source, "cpu")
        settings = json.loads((self.folder / "sentence_bert_config.json").read_text())
        self.window = int(settings["max_seq_length"])
        self.config = self.model.config
        self.torch = torch

    def reference(self, texts: list[str]) -> np.ndarray:
        return self.torch_runner()(self.encode(texts))

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        return dict(self.tokenizer(texts, padding=True, truncation=True,
                                   max_length=self.window, return_tensors="np"))

    def torch_runner(self) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        torch = self.torch

        def run(batch: dict[str, np.ndarray]) -> np.ndarray:
            tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
            with torch.inference_mode():
                hidden = self.model(**tensors).last_hidden_state
                mask = tensors["attention_mask"].unsqueeze(-1).float()
                vectors = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
            return vectors.numpy()
        return run


class OrtRunner:
    def __init__(self, path: Path, threads: int, level: Any = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL \
            if level is None else level
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name: (np.int32 if i.type == "tensor(int32)" else np.int64)
                       for i in self.session.get_inputs()}
        self.pooled = len(self.session.get_outputs()[0].shape) == 2

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: batch[name].astype(dtype, copy=False)
                for name, dtype in self.inputs.items()}
        out = self.session.run(None, feed)[0]
        if self.pooled:
            return np.asarray(out, np.float32)
        return pool(np.asarray(out, np.float32), batch["attention_mask"])


# --- the quality gate -------------------------------------------------------------------


@dataclass
class Quality:
    min_cosine: float
    mean_cosine: float
    worst: str
    top1: int  # queries whose nearest document is the reference's
    top5: int  # queries whose 5 nearest are the reference's, in its order, exactly
    top5_ties: int  # the same, except that reference near-ties (< TIE apart) may swap
    held_out: float  # min cosine on texts the search never sees

    @property
    def passes(self) -> bool:
        """The gate: the probes and the retrieval set."""
        return self.min_cosine >= MIN_COSINE and self.top1 == len(QUERIES) \
            and self.top5_ties == len(QUERIES)

    @property
    def holds(self) -> bool:
        """The gate, and the held-out texts too."""
        return self.passes and self.held_out >= MIN_COSINE

    def cells(self) -> list[str]:
        n = len(QUERIES)
        return [f"{self.min_cosine:.4f}", f"{self.mean_cosine:.5f}", self.worst,
                f"{self.top1}/{n}", f"{self.top5}/{n}", f"{self.top5_ties}/{n}",
                "**yes**" if self.passes else "no", f"{self.held_out:.4f}",
                "**yes**" if self.holds else "no"]


QUALITY_HEADER = ["min cos", "mean cos", "worst probe", "top-1", "top-5 exact",
                  f"top-5 (ties < {TIE})", "gate", "held-out min cos", "gate + held-out"]


class Gate:
    """The reference vectors (float32 PyTorch, the worker's path) and the checks."""

    def __init__(self, bench: Bench) -> None:
        self.labels = list(PROBES)
        self.probes = [PROBES[label] for label in self.labels]
        self.probe_vectors = bench.reference(self.probes)
        self.query_vectors = bench.reference(QUERIES)
        self.document_vectors = bench.reference(DOCUMENTS)
        self.scores = self.query_vectors @ self.document_vectors.T
        self.rankings = np.argsort(-self.scores, axis=1)
        self.gaps = sorted((float(row[order[i]] - row[order[i + 1]]), q, i + 1)
                           for q, (row, order) in enumerate(zip(self.scores, self.rankings))
                           for i in range(TOP))
        held_out = TINY + mixed_texts()
        self.held_out_vectors = np.concatenate(
            [bench.reference([t]) for t in TINY] +
            [bench.reference(held_out[i:i + 32]) for i in range(0, len(held_out), 32)])
        self.batches = {
            "held_out": [bench.encode([t]) for t in TINY] +
                        [bench.encode(held_out[i:i + 32]) for i in range(0, len(held_out), 32)],
            "probes": bench.encode(self.probes),
            "queries": bench.encode(QUERIES),
            "documents": bench.encode(DOCUMENTS),
            "single": [bench.encode([text]) for text in self.probes]}

    def check(self, run: Callable[[dict[str, np.ndarray]], np.ndarray]) -> Quality:
        batched = normalized(run(self.batches["probes"]))
        single = normalized(np.concatenate([run(b) for b in self.batches["single"]]))
        queries = normalized(run(self.batches["queries"]))
        documents = normalized(run(self.batches["documents"]))
        pairs = [(batched, self.probe_vectors, self.labels),
                 (single, self.probe_vectors, [f"{label} (alone)" for label in self.labels]),
                 (queries, self.query_vectors, ["a query"] * len(QUERIES)),
                 (documents, self.document_vectors, ["a document"] * len(DOCUMENTS))]
        cosines: list[tuple[float, str]] = []
        for got, want, labels in pairs:
            cosines += zip((got * want).sum(axis=1).tolist(), labels)
        low = min(cosines)
        scores = queries @ documents.T
        ranking = np.argsort(-scores, axis=1)
        top1 = int((ranking[:, 0] == self.rankings[:, 0]).sum())
        top5 = int((ranking[:, :TOP] == self.rankings[:, :TOP]).all(axis=1).sum())
        held = 0
        for want, got, order in zip(self.scores, scores, self.rankings):
            # every document of the reference's top 5 stays ahead of every document that
            # the reference puts more than TIE below it
            held += all(got[a] > got[b] for a in order[:TOP] for b in range(len(want))
                        if want[a] - want[b] > TIE)
        other = normalized(np.concatenate([run(b) for b in self.batches["held_out"]]))
        return Quality(low[0], statistics.fmean(c for c, _ in cosines), low[1], top1, top5,
                       held, float((other * self.held_out_vectors).sum(axis=1).min()))


# --- export, optimize, quantize -----------------------------------------------------------

NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def export(bench: Bench, path: Path, dynamo: bool, pooled: bool, attention: str = "sdpa",
           token_types: bool = True, opset: int | None = None) -> dict[str, Any]:
    """torch.onnx.export of the AutoModel (its last_hidden_state, or the pooled and
    normalized vectors), dynamic batch and sequence axes; what it took and what it said."""
    import onnx

    torch = bench.torch
    names = NAMES if token_types else NAMES[:2]

    class Graph(torch.nn.Module):  # only last_hidden_state: BertModel's pooler is dropped
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            # keywords: transformers 5's BertModel.forward takes no positional tuple
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                token_type_ids=token_type_ids).last_hidden_state
            if not pooled:
                return hidden
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            vectors = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            # what F.normalize computes, without its Expand (the transformers optimizer's
            # symbolic shape inference fails on it, and then fuses no SkipLayerNormalization)
            norm = vectors.pow(2).sum(dim=1, keepdim=True).sqrt().clamp(min=1e-12)
            return vectors / norm

    bench.model.set_attn_implementation(attention)
    # a padded sample: the traced graph must keep the attention mask
    sample = bench.tokenizer(["a short one", "a longer sentence, so that the other is padded"],
                             padding=True, return_tensors="pt")
    args = tuple(sample[name] for name in names)
    output = "sentence_embedding" if pooled else "last_hidden_state"
    graph = Graph(bench.model).eval()
    start = time.perf_counter()
    try:  # the dynamo exporter prints its steps: kept out of the tables
        with warnings.catch_warnings(record=True) as caught, torch.no_grad(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("always")
            if dynamo:
                batch = torch.export.Dim("batch")
                sequence = torch.export.Dim("sequence", max=bench.config.max_position_embeddings)
                torch.onnx.export(graph, args, str(path), input_names=names,
                                  output_names=[output], opset_version=opset, dynamo=True,
                                  external_data=False,
                                  dynamic_shapes={n: {0: batch, 1: sequence} for n in names})
            else:
                axes = {name: {0: "batch", 1: "sequence"} for name in names}
                axes[output] = {0: "batch"} if pooled else {0: "batch", 1: "sequence"}
                torch.onnx.export(graph, args, str(path), input_names=names,
                                  output_names=[output], opset_version=opset, dynamo=False,
                                  dynamic_axes=axes)
    finally:
        bench.model.set_attn_implementation("sdpa")
    seconds = time.perf_counter() - start
    model = onnx.load(str(path), load_external_data=False)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    said = sorted({f"{type(w.message).__name__}: {str(w.message).splitlines()[0][:70]}"
                   for w in caught})
    return {"seconds": seconds, "size": path.stat().st_size, "opset": opsets.get("ai.onnx"),
            "nodes": len(model.graph.node), "warnings": said}


def optimize(bench: Bench, source: Path, target: Path, opt_level: int,
             attention: bool = True) -> dict[str, int]:
    """onnxruntime.transformers' BERT optimizer (fusions), saved as a file; the fused
    operators it reports."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    fusion = FusionOptions("bert")
    fusion.enable_attention = attention
    model = optimize_model(str(source), model_type="bert",
                           num_heads=bench.config.num_attention_heads,
                           hidden_size=bench.config.hidden_size,
                           opt_level=opt_level, use_gpu=False, optimization_options=fusion)
    model.save_model_to_file(str(target))
    return {k: v for k, v in model.get_fused_operator_statistics().items() if v}


KINDS = ["embed", "qkv", "attn_out", "ffn_up", "ffn_down", "other"]


def node_groups(path: Path, layers: int) -> dict[str, tuple[str, int]]:
    """Each node quantize_dynamic would quantize: (kind, layer); layer -1 outside the
    encoder layers. The layer is the node's rank among its kind in graph order, so fused
    nodes (Attention_3) and renamed ones (dynamo) are placed too."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constant = {i.name for i in graph.initializer} | \
        {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    found: list[tuple[str, str]] = []
    for node in graph.node:
        name = node.name.lower().replace(".", "/").replace("_", "/")
        if node.op_type in ("Gather", "EmbedLayerNormalization"):
            if node.op_type == "Gather" and node.input[0] not in constant:
                continue
            kind = "embed"
        elif node.op_type == "Attention":
            kind = "qkv"
        elif node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in constant:
            if any(k in name for k in ("/query", "/key", "/value")):
                kind = "qkv"
            elif "attention/output" in name:
                kind = "attn/out"
            elif "intermediate" in name:
                kind = "ffn/up"
            elif "output/dense" in name:
                kind = "ffn/down"
            else:
                kind = "other"
            kind = kind.replace("/", "_")
        else:
            continue
        found.append((node.name, kind))
    groups: dict[str, tuple[str, int]] = {}
    for kind in KINDS:
        names = [n for n, k in found if k == kind]
        per_layer = len(names) // layers if kind not in ("embed", "other") else 0
        for i, name in enumerate(names):
            groups[name] = (kind, i // per_layer if per_layer else -1)
    return groups


def quantize_int8(source: Path, target: Path, exclude: list[str] | None = None,
                  per_channel: bool = False, reduce_range: bool = False,
                  unsigned: bool = False) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnx's shape inference gives no type to the outputs of the optimizer's contrib ops
    # (Attention, SkipLayerNormalization...): without DefaultTensorType it raises
    quantize_dynamic(str(source), str(target), per_channel=per_channel,
                     reduce_range=reduce_range, nodes_to_exclude=exclude or [],
                     weight_type=QuantType.QUInt8 if unsigned else QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def quantize_nbits(source: Path, target: Path, bits: int, block: int) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=bits, block_size=block,
                                     is_symmetric=True, accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=False)


def quantize_static_int8(bench: Bench, source: Path, target: Path, exclude: list[str],
                         method: str, per_channel: bool) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                          QuantFormat, QuantType, quantize_static)

    texts = calibration_texts()
    # one width for every batch: the histogram calibrators (Percentile, Entropy) need it
    batches = [dict(bench.tokenizer(texts[i:i + 16], padding="max_length", truncation=True,
                                    max_length=bench.window, return_tensors="np"))
               for i in range(0, len(texts), 16)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                    op_types_to_quantize=["MatMul"],
                    calibrate_method=getattr(CalibrationMethod, method))


def to_float16(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(target))


# --- timing -------------------------------------------------------------------------------


def rate(run: Callable[[Any], Any], calls: list[Any], sentences: int, budget: float) -> float:
    """Sentences/s for making every call once, each call timed at its best over its share
    of ``budget`` (the best, not the median: other work on the machine only adds time)."""
    total = 0.0
    for call in calls:
        run(call)
        best = float("inf")
        deadline = time.perf_counter() + budget / len(calls)
        repeats = 0
        while repeats < 3 or time.perf_counter() < deadline:
            start = time.perf_counter()
            run(call)
            best = min(best, time.perf_counter() - start)
            repeats += 1
        total += best
    return sentences / total


def per_call_ms(run: Callable[[], Any], budget: float) -> float:
    run()
    best = float("inf")
    deadline = time.perf_counter() + budget
    repeats = 0
    while repeats < 5 or time.perf_counter() < deadline:
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
        repeats += 1
    return best * 1000


def table(header: list[str], rows: list[list[Any]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print(flush=True)


def mib(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f}"


@dataclass
class Variant:
    name: str
    path: Path | None  # None: PyTorch
    quality: Quality | None = None
    timed: bool = False  # in the speed table


class Workloads:
    def __init__(self, bench: Bench) -> None:
        self.queries = [bench.encode([q]) for q in QUERIES]
        self.mixed = mixed_texts()
        self.batches = [bench.encode(self.mixed[i:i + 32]) for i in range(0, len(self.mixed), 32)]

    def speeds(self, run: Callable[[Any], Any], budget: float) -> tuple[float, float]:
        return (rate(run, self.queries, len(self.queries), budget),
                rate(run, self.batches, len(self.mixed), budget))


# --- the run ------------------------------------------------------------------------------

EXPORTS = [  # label, dynamo, pooled, attention, token_type_ids
    ("legacy, sdpa", False, False, "sdpa", True),
    ("legacy, eager", False, False, "eager", True),
    ("legacy, eager, pooled", False, True, "eager", True),
    ("legacy, eager, pooled, no token_type_ids", False, True, "eager", False),
    ("dynamo, sdpa", True, False, "sdpa", True),
    ("dynamo, eager", True, False, "eager", True),
    ("dynamo, eager, pooled", True, True, "eager", True),
]
BASE = "legacy, eager, pooled"  # what the precision variants start from (at opt_level 2)

# The groups the greedy search left in float32 on the reference machine (2-core AMD EPYC
# with AVX-512 VNNI, onnxruntime 1.32): (kind, layer). Used with --no-search.
GREEDY = [("ffn_down", 0), ("ffn_down", 2), ("ffn_up", 2), ("ffn_up", 3), ("ffn_up", 4),
          ("qkv", 3), ("qkv", 4), ("qkv", 5)]


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).replace("--", "-").strip("-")


def shipped() -> None:
    """The gate on what the worker runs: the export of embedding_engines (made or loaded
    from its cache), its engine's hidden states pooled here as for every variant."""
    from app.config import WorkerSettings
    from app.worker import embedding_engines

    logging.getLogger().setLevel(logging.ERROR)
    bench = Bench()
    gate = Gate(bench)
    engine, _, _ = embedding_engines.load_engine(loading.resolve("all-minilm-l6-v2"),
                                                 WorkerSettings(engine="onnx"))

    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        inputs = {k: v.astype(np.int64) for k, v in batch.items()
                  if k != "token_type_ids" or engine.takes_token_types}
        return pool(engine.hidden_states(inputs), batch["attention_mask"])
    print("| engine | " + " | ".join(QUALITY_HEADER) + " |")
    print("|---" * (len(QUALITY_HEADER) + 1) + "|")
    print(f"| {engine.summary} | " + " | ".join(gate.check(run).cells()) + " |")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--budget", type=float, default=3.0,
                        help="seconds per timing (each call at its best within its share)")
    parser.add_argument("--no-search", action="store_true",
                        help="skip the int8 sensitivity table and the greedy search (use the "
                             "groups it found here)")
    parser.add_argument("--out", type=Path, default=loading.cache_dir() / "bench" / "embedding")
    parser.add_argument("--shipped", action="store_true",
                        help="only the gate, on the export the worker's onnx engine loads")
    options = parser.parse_args()
    if options.shipped:
        shipped()
        return
    out: Path = options.out
    out.mkdir(parents=True, exist_ok=True)
    budget, threads = options.budget, options.threads[0]

    import onnx
    import onnxruntime as ort
    import tokenizers
    import transformers

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice, the optimizer's notes
    ort.set_default_logger_severity(3)
    bench = Bench()
    torch = bench.torch
    try:
        import onnxscript
        onnxscript_version: str | None = onnxscript.__version__
    except ImportError:
        onnxscript_version = None
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, tokenizers "
          f"{tokenizers.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}, "
          f"onnxscript {onnxscript_version or 'not installed'}, numpy {np.__version__}; "
          f"{len(os.sched_getaffinity(0))} cores; artifacts in {out}\n")
    gate = Gate(bench)
    work = Workloads(bench)
    gaps = ", ".join(f"{gap:.4f} (query {q}, ranks {rank}/{rank + 1})"
                     for gap, q, rank in gate.gaps[:4])
    print(f"Reference: float32 PyTorch, window {bench.window} tokens. The smallest gaps between "
          f"consecutive scores in its top {TOP + 1}: {gaps}\n")

    # 1. export
    print("## 1. Export\n")
    exports: dict[str, Path] = {}
    rows = []
    for label, dynamo, pooled, attention, token_types in EXPORTS:
        path = out / f"fp32-{slug(label)}.onnx"
        if dynamo and onnxscript_version is None:
            rows.append([label, "-", "-", "-", "-", "needs onnxscript (not installed)"])
            continue
        try:
            info = export(bench, path, dynamo, pooled, attention, token_types)
        except Exception as exc:  # report it and go on
            rows.append([label, "-", "-", "-", "-", f"failed: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120]}"])
            continue
        exports[label] = path
        rows.append([label, f"{info['seconds']:.1f} s", f"{info['size'] / 2**20:.1f} MiB",
                     info["opset"], info["nodes"], "; ".join(info["warnings"]) or "none"])
    table(["export", "time", "size", "opset", "nodes", "warnings"], rows)

    # 2. graph optimizations
    print("## 2. Graph optimizations\n")
    graphs: dict[str, Path] = {}
    rows = []
    for label, path in exports.items():
        graphs[label] = path
        one, many = work.speeds(OrtRunner(path, threads), budget)
        fused, timings = "-", []
        for level in (1, 2):
            target = out / f"{path.stem}-opt{level}.onnx"
            start = time.perf_counter()
            try:
                stats = optimize(bench, path, target, level)
            except Exception as exc:
                timings.append(f"failed: {type(exc).__name__}: {exc}"[:160])
                continue
            seconds = time.perf_counter() - start
            graphs[f"{label}, opt_level {level}"] = target
            fused = ", ".join(f"{k} {v}" for k, v in stats.items())
            quality = gate.check(OrtRunner(target, threads))
            speeds = work.speeds(OrtRunner(target, threads), budget)
            timings.append(f"{speeds[0]:.0f} / {speeds[1]:.1f} ({seconds:.1f} s, min cos "
                           f"{quality.min_cosine:.6f})")
        rows.append([label, f"{one:.0f} / {many:.1f}", fused, *timings])
    table(["export", f"as exported: sent/s batch 1 / 32 ({threads} thr)",
           "fused by the optimizer", "optimize_model opt_level 1: sent/s (optimizer time, "
           "min cos)", "opt_level 2: sent/s (optimizer time, min cos)"], rows)

    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all (default)": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    base = graphs[f"{BASE}, opt_level 2"]
    rows = []
    for label in ["legacy, sdpa", f"{BASE}, opt_level 2"]:
        for name, level in levels.items():
            one, many = work.speeds(OrtRunner(graphs[label], threads, level), budget)
            rows.append([label, name, f"{one:.0f}", f"{many:.1f}"])
    table(["graph", "SessionOptions.graph_optimization_level",
           f"batch 1 sent/s ({threads} thr)", f"batch 32 sent/s ({threads} thr)"], rows)

    # 3. precision
    print("## 3. Precision\n")
    layers = bench.config.num_hidden_layers
    groups = node_groups(base, layers)
    variants = [Variant("PyTorch float32 (reference)", None, timed=True),
                Variant("onnx float32: legacy export (sdpa), as is", graphs["legacy, sdpa"],
                        timed=True),
                Variant("onnx float32: legacy export (eager), optimizer opt_level 2",
                        graphs["legacy, eager, opt_level 2"], timed=True),
                Variant(f"onnx float32: {BASE}, optimizer opt_level 2", base, timed=True)]

    def add(name: str, path: Path, timed: bool = True) -> None:
        variants.append(Variant(name, path, timed=timed))

    def int8(name: str, source: Path, exclude: list[str] | None = None, **kwargs: Any) -> None:
        path = out / f"int8-{slug(name)}.onnx"
        quantize_int8(source, path, exclude, **kwargs)
        add(name, path)

    int8("int8 naive: quantize_dynamic(legacy sdpa export), defaults", graphs["legacy, sdpa"])
    int8("int8 naive on the optimized graph", base)
    int8("int8 per_channel", base, per_channel=True)
    int8("int8 reduce_range", base, reduce_range=True)
    int8("int8 per_channel + reduce_range", base, per_channel=True, reduce_range=True)
    int8("int8 QUInt8 weights", base, unsigned=True)
    int8("int8 per_channel QUInt8 weights", base, per_channel=True, unsigned=True)
    try:
        to_float16(base, out / "fp16.onnx")
        add("float16 (float32 inputs and outputs)", out / "fp16.onnx")
    except Exception as exc:
        print(f"float16 failed: {type(exc).__name__}: {exc}\n")
    for bits, block in [(8, 32), (8, 128), (8, 256), (4, 32)]:
        path = out / f"nbits{bits}-b{block}.onnx"
        quantize_nbits(base, path, bits, block)
        add(f"MatMulNBits {bits}-bit, block {block}, accuracy_level 4 (FFN + attention output)",
            path)
    unfused = out / "fp32-no-attention-fusion.onnx"
    optimize(bench, exports[BASE], unfused, 2, attention=False)
    add(f"onnx float32: {BASE}, opt_level 2 without attention fusion", unfused)
    path = out / "nbits8-b32-every-matmul.onnx"
    quantize_nbits(unfused, path, 8, 32)
    add("MatMulNBits 8-bit, block 32, accuracy_level 4, attention not fused (every MatMul)", path)
    exclude = [n for n, (kind, _) in groups.items() if kind in ("embed", "other")]
    for method, per_channel in [("MinMax", True), ("MinMax", False)]:
        path = out / f"int8-static-{method}-{per_channel}.onnx"
        try:
            quantize_static_int8(bench, base, path, exclude, method, per_channel)
        except Exception as exc:
            print(f"static int8 ({method}) failed: {type(exc).__name__}: {exc}\n")
            continue
        add(f"int8 static QDQ, MatMuls, {method}, per_channel {per_channel}", path)
    for method in ("Percentile", "Entropy"):
        try:
            quantize_static_int8(bench, base, out / "static.onnx", exclude, method, True)
        except Exception as exc:
            print(f"static int8 with {method} calibration failed: {type(exc).__name__}: "
                  f"{str(exc)[:120]}\n")

    for variant in variants:
        run = bench.torch_runner() if variant.path is None else OrtRunner(variant.path, threads)
        variant.quality = gate.check(run)

    excluded = GREEDY if options.no_search else int8_search(gate, base, out, groups, threads)
    names = [n for n, group in groups.items() if group in excluded]
    label = ", ".join(f"{kind}@{layer}" for kind, layer in sorted(excluded))
    int8(f"int8 per_channel, float32: {label}", base, names, per_channel=True)
    variants[-1].quality = gate.check(OrtRunner(variants[-1].path, threads))  # type: ignore
    kinds = {"FFN up": "ffn_up", "QKV": "qkv", "FFN down": "ffn_down"}
    for title, kind in kinds.items():
        names = [n for n, group in groups.items() if group[0] == kind]
        int8(f"int8 per_channel, float32: every {title}", base, names, per_channel=True)
        variants[-1].quality = gate.check(OrtRunner(variants[-1].path, threads))  # type: ignore

    rows = []
    for variant in variants:
        size = mib(variant.path) if variant.path else \
            f"{mib(bench.folder / 'model.safetensors')} (safetensors)"
        rows.append([variant.name, size] + variant.quality.cells())  # type: ignore
    table(["variant", "MiB"] + QUALITY_HEADER, rows)

    # 4. speed
    print("## 4. Speed (sentences/s; tokenization excluded, pooling included)\n")
    print(f"Batch 1: the {len(QUERIES)} queries one per call (~10 tokens). Batch 32: "
          f"{len(work.mixed)} texts of mixed lengths (1-13 documents) in batches of 32 as "
          "they come, each padded to its longest.\n")
    header = ["variant"] + [f"{what}, {n} thr" for n in options.threads
                            for what in ("batch 1", "batch 32")]
    rows = []
    fastest: tuple[float, Variant | None] = (0.0, None)
    for variant in variants:
        quality = variant.quality
        assert quality is not None
        if variant.path is not None and not quality.passes and "naive" not in variant.name:
            continue
        cells = [variant.name + ("" if quality.holds else " (**fails the gate**)"
                                 if not quality.passes else " (**fails held-out**)")]
        for n in options.threads:
            if variant.path is None:
                torch.set_num_threads(n)
                one, many = work.speeds(bench.torch_runner(), budget)
            else:
                one, many = work.speeds(OrtRunner(variant.path, n), budget)
            cells += [f"{one:.0f}", f"{many:.1f}"]
            if n == threads and quality.holds and variant.path is not None \
                    and many > fastest[0]:
                fastest = (many, variant)
        rows.append(cells)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    table(header, rows)
    chosen = fastest[1]
    if chosen is not None and chosen.path is not None:
        print(f"Fastest that passes the gate and the held-out texts (batch 32, {threads} "
              f"threads): {chosen.name}\n")
        padding(bench, chosen.path, work.mixed, options.threads, budget)
        hidden = graphs["legacy, eager, opt_level 2"]
        rows = []
        for label, path in [("pooling in numpy (graph outputs last_hidden_state)", hidden),
                            ("pooling + normalize in the graph", base)]:
            cells = [label]
            for n in options.threads:
                one, many = work.speeds(OrtRunner(path, n), budget)
                cells += [f"{one:.0f}", f"{many:.1f}"]
            rows.append(cells)
        print("Pooling inside the graph or in numpy (float32, optimizer opt_level 2):\n")
        table(["graph"] + header[1:], rows)

    # 5. tokenization and pooling
    print("## 5. Tokenization and pooling (best of repeated calls)\n")
    rows = []
    for label, texts in [("1 short query", QUERIES[:1]), ("32 mixed texts", work.mixed[:32]),
                         ("1 text past the window", [PROBES["far past the window"]])]:
        ms = per_call_ms(lambda: bench.encode(texts), budget)
        rows.append([f"tokenizer(..., return_tensors='np'), {label}", f"{ms:.3f}",
                     f"{len(texts) / ms * 1000:.0f}"])
    batch = work.batches[0]
    hidden_states = np.random.default_rng(0).standard_normal(
        (32, batch["input_ids"].shape[1], bench.config.hidden_size)).astype(np.float32)
    ms = per_call_ms(lambda: pool(hidden_states, batch["attention_mask"]), budget)
    rows.append([f"numpy mean pooling + normalize, {hidden_states.shape}", f"{ms:.3f}",
                 f"{32 / ms * 1000:.0f}"])
    one = work.queries[0]
    single = hidden_states[:1, :one["input_ids"].shape[1]]
    ms = per_call_ms(lambda: pool(single, one["attention_mask"]), budget)
    rows.append([f"numpy mean pooling + normalize, {single.shape}", f"{ms:.3f}",
                 f"{1 / ms * 1000:.0f}"])
    table(["step", "ms per call", "sentences/s"], rows)


def int8_search(gate: Gate, base: Path, out: Path, groups: dict[str, tuple[str, int]],
                threads: int) -> list[tuple[str, int]]:
    """Which node groups per-channel int8 breaks, and the groups to leave in float32 (the
    most sensitive first) until the gate holds."""
    work = out / "search.onnx"
    everything = set(groups.values())

    def score(quantized: set[tuple[str, int]]) -> Quality:
        quantize_int8(base, work, [n for n, g in groups.items() if g not in quantized],
                      per_channel=True)
        return gate.check(OrtRunner(work, threads))

    print("int8 per_channel, one group quantized, the rest float32 (layer -1: not in a "
          "layer):\n")
    rows = []
    sensitivity: dict[tuple[str, int], float] = {}
    for kind in KINDS:
        members = sorted(g for g in everything if g[0] == kind)
        if not members:
            continue
        if len(members) > 1:
            rows.append([kind, "all"] + score(set(members)).cells())
        for group in members:
            quality = score({group})
            sensitivity[group] = quality.min_cosine
            rows.append([kind, group[1]] + quality.cells())
    table(["kind", "layer"] + QUALITY_HEADER, rows)

    print("Greedy: the most sensitive group back to float32, one at a time:\n")
    rows = []
    excluded: list[tuple[str, int]] = []
    for group in sorted(sensitivity, key=lambda g: sensitivity[g]) + [None]:
        quality = score(everything - set(excluded))
        rows.append([", ".join(f"{k}@{n}" for k, n in excluded) or "none"] + quality.cells())
        if quality.passes or group is None:
            break
        excluded.append(group)
    table(["float32 groups", *QUALITY_HEADER], rows)
    return excluded


def padding(bench: Bench, path: Path, mixed: list[str], threads: list[int],
            budget: float) -> None:
    """Requests of 32 mixed-length texts: one padded batch, or sorted by length and split
    into smaller batches; and all 128 sorted before they are cut into batches of 32."""
    lengths = [len(ids) for ids in bench.tokenizer(mixed, truncation=True,
                                                   max_length=bench.window)["input_ids"]]
    requests = [list(range(i, i + 32)) for i in range(0, len(mixed), 32)]
    plans: dict[str, list[dict[str, np.ndarray]]] = {}
    for size in (32, 16, 8, 4, 1):
        calls = []
        for request in requests:
            order = sorted(request, key=lambda i: lengths[i]) if size < 32 else request
            for start in range(0, 32, size):
                calls.append(bench.encode([mixed[i] for i in order[start:start + size]]))
        plans["one padded batch of 32" if size == 32 else
              f"sorted by length, batches of {size}"] = calls
    ordered = sorted(range(len(mixed)), key=lambda i: lengths[i])
    plans[f"all {len(mixed)} sorted, then batches of 32"] = [
        bench.encode([mixed[i] for i in ordered[s:s + 32]]) for s in range(0, len(mixed), 32)]
    tokens = sum(lengths)
    rows = []
    for label, calls in plans.items():
        padded = sum(int(np.prod(c["input_ids"].shape)) for c in calls)
        cells = [label, f"{tokens / padded:.0%}"]
        for n in threads:
            cells.append(f"{rate(OrtRunner(path, n), calls, len(mixed), budget):.1f}")
        rows.append(cells)
    print(f"Padding, on that graph ({len(mixed)} texts of {min(lengths)}-{max(lengths)} "
          f"tokens, {tokens / len(mixed):.0f} on average):\n")
    table(["plan", "real tokens / padded"] + [f"sent/s, {n} thr" for n in threads], rows)


if __name__ == "__main__":
    main()

"""A sentence-transformers model (transformer + pooling + normalize) behind the worker's
/worker_get_embeddings, without the sentence-transformers package, on either engine
(app.worker.embedding_engines: onnxruntime, or PyTorch).

A request's inputs are tokenized in its own thread (the fast tokenizer's batch call,
truncated to the model's window); the batcher (app.worker.embedding_batching) merges them
with other requests' and calls ``_encode`` per batch: padding, the engine, pooling (mean,
CLS or max, as the model's Pooling module says) and normalization, all in numpy.

Vectors are always float32, so base64 output is little-endian float32 whatever dtype the
weights have (FastChat sends the tensor's raw bytes, float16 for some models).
"""
from __future__ import annotations

import base64
import json
import threading
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from app.worker.embedding_batching import EmbeddingBatcher, Limits

DEFAULT_MAX_SEQ_LENGTH = 512


class EmbeddingEngine(Protocol):
    name: str
    summary: str  # for the log line when loaded
    takes_token_types: bool
    runners: int  # batches run at once

    def hidden_states(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """(batch, tokens, dim) float32 for int64 input_ids / attention_mask (and
        token_type_ids when ``takes_token_types``)."""


class EmbeddingModel:
    def __init__(self, engine: EmbeddingEngine, tokenizer: Any, folder: Path, config: Any,
                 limits: Limits = Limits()) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.pooling = _pooling_mode(folder)
        self.normalize = _has_normalize(folder)
        self.max_seq_length = _max_seq_length(folder, config)
        self.context_length = self.max_seq_length
        self.dimensions = int(config.hidden_size)
        self._pad = tokenizer.pad_token_id or 0
        self.batcher = EmbeddingBatcher(self._encode, self.dimensions, limits,
                                        engine.runners)

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def embed(self, texts: list[str],
              cancel: threading.Event | None = None) -> tuple[np.ndarray, int]:
        """(vectors, token_num): inputs longer than the model's window are truncated.
        Raises embedding_batching.Cancelled once ``cancel`` is set."""
        ids = self.tokenize(texts)
        vectors = self.batcher.embed(ids, cancel or threading.Event())
        return vectors, sum(len(row) for row in ids)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        encoded: list[list[int]] = self.tokenizer(
            texts, truncation=True, max_length=self.max_seq_length)["input_ids"]
        return encoded

    def _encode(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """One batch: padded to its longest input, through the engine, pooled."""
        width = max(len(row) for row in ids)
        input_ids = np.full((len(ids), width), self._pad, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, tokens in enumerate(ids):
            input_ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        if self.engine.takes_token_types:
            inputs["token_type_ids"] = np.zeros_like(input_ids)
        return pooled(self.engine.hidden_states(inputs), mask, self.pooling, self.normalize)

    @staticmethod
    def as_base64(vector: np.ndarray) -> str:
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")


def pooled(hidden: np.ndarray, mask: np.ndarray, pooling: str,
           normalize: bool) -> np.ndarray:
    """Sentence vectors from token vectors: (batch, tokens, dim) -> (batch, dim)."""
    hidden = hidden.astype(np.float32, copy=False)
    if pooling == "cls":
        vectors = hidden[:, 0]
    elif pooling == "max":
        vectors = np.where(mask[:, :, None] > 0, hidden, -np.inf).max(axis=1)
    elif pooling == "last":
        vectors = hidden[np.arange(len(hidden)), mask.sum(axis=1) - 1]
    else:
        weights = mask[:, :, None].astype(np.float32)
        vectors = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    result: np.ndarray = np.ascontiguousarray(vectors, dtype=np.float32)
    return result


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pooling_mode(folder: Path) -> str:
    for module in _read_json(folder / "modules.json") or []:
        if module.get("type", "").endswith("Pooling"):
            config = _read_json(folder / module.get("path", "") / "config.json") or {}
            if config.get("pooling_mode_cls_token"):
                return "cls"
            if config.get("pooling_mode_max_tokens"):
                return "max"
            if config.get("pooling_mode_lasttoken"):
                return "last"
    return "mean"


def _has_normalize(folder: Path) -> bool:
    modules = _read_json(folder / "modules.json")
    if not modules:
        return True  # FastChat normalizes every embedding
    return any(m.get("type", "").endswith("Normalize") for m in modules)


def _max_seq_length(folder: Path, config: Any) -> int:
    settings = _read_json(folder / "sentence_bert_config.json") or {}
    value = settings.get("max_seq_length") or getattr(config, "max_position_embeddings", None)
    return int(value) if value else DEFAULT_MAX_SEQ_LENGTH

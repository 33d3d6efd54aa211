"""A sentence-transformers model (transformer + pooling + normalize) behind the worker's
/worker_get_embeddings, without the sentence-transformers package.

Vectors are always computed in float32, so base64 output is little-endian float32 whatever
dtype the weights have (FastChat sends the tensor's raw bytes, float16 for some models).
"""
from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import torch

DEFAULT_MAX_SEQ_LENGTH = 512


class EmbeddingModel:
    def __init__(self, model: Any, tokenizer: Any, folder: Path) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = _pooling_mode(folder)
        self.normalize = _has_normalize(folder)
        self.max_seq_length = _max_seq_length(folder, model.config)
        self.context_length = self.max_seq_length
        self.device = next(model.parameters()).device

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """(vectors, token_num): inputs longer than the model's window are truncated."""
        batch = self.tokenizer(texts, padding=True, truncation=True,
                               max_length=self.max_seq_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        if self.pooling == "cls":
            vectors = hidden[:, 0]
        elif self.pooling == "max":
            vectors = hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
        else:
            vectors = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
        token_num = int(batch["attention_mask"].sum())
        return vectors.cpu().tolist(), token_num

    @staticmethod
    def as_base64(vector: list[float]) -> str:
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


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

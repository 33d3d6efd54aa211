"""Choosing the next token: penalties, temperature, top-k, top-p, as FastChat maps them.

Greedy below temperature 1e-5 or top_p 1e-8 (FastChat's thresholds). The repetition
penalty is CTRL's, over prompt and reply; presence and frequency penalties are OpenAI's,
over the reply only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_p < 1e-8

    @classmethod
    def from_params(cls, params: Any) -> "Sampling":
        return cls(temperature=float(params["temperature"]), top_p=float(params["top_p"]),
                   top_k=int(params["top_k"]),
                   repetition_penalty=float(params["repetition_penalty"]),
                   presence_penalty=float(params["presence_penalty"]),
                   frequency_penalty=float(params["frequency_penalty"]))


# Nucleus sampling sorts only the tokens more likely than this, and the whole vocabulary
# only when they hold less than top_p of the mass (a flat distribution): a sort of 49k
# scores costs ~5 ms per token on one core, the filter and a sort of what passes ~0.1 ms.
NUCLEUS_FLOOR = 1e-4


def new_rng(seed: int | None) -> np.random.Generator:
    """A request's random numbers: repeatable with a seed (any int), else fresh."""
    return np.random.default_rng(None if seed is None else seed % 2**64)


def next_token(logits: torch.Tensor, context: list[int], reply: list[int], cfg: Sampling,
               rng: np.random.Generator) -> int:
    """``logits``: the last position's scores (1-D). Returns the chosen token id.

    In numpy on the CPU (a view of the logits there): per row and per token, numpy's calls
    cost a few microseconds where torch's dispatch costs tens."""
    scores = _penalized(logits.detach().float().cpu().numpy(), context, reply, cfg)
    if cfg.greedy:
        return int(scores.argmax())
    scaled = scores / cfg.temperature
    size = int(scaled.shape[-1])
    if 0 < cfg.top_k < size:
        values, order = torch.topk(torch.from_numpy(scaled), cfg.top_k)  # most likely first
        ids = order.numpy()
        probabilities = _softmax(values.numpy())
    elif cfg.top_p < 1.0:
        everything = _softmax(scaled)
        ids = np.flatnonzero(everything > NUCLEUS_FLOOR)
        if everything[ids].sum() < cfg.top_p:
            ids = np.arange(size)
        ids = ids[np.argsort(-everything[ids], kind="stable")]
        probabilities = everything[ids]
    else:  # the whole vocabulary: torch's softmax and cumsum are the faster here
        whole = torch.softmax(torch.from_numpy(scaled), dim=-1).cumsum(dim=-1)
        draw = torch.tensor([rng.random()], dtype=whole.dtype) * whole[-1]
        chosen: int = int(torch.searchsorted(whole, draw, right=True).item())
        return min(chosen, size - 1)
    if cfg.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        cumulative = np.cumsum(probabilities)
        kept = max(1, int(np.count_nonzero(cumulative - probabilities < cfg.top_p)))
        probabilities, ids = probabilities[:kept], ids[:kept]
    cumulative = np.cumsum(probabilities)
    chosen = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return int(ids[min(chosen, len(ids) - 1)])


def _softmax(scores: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    shifted = np.exp(scores - scores.max())
    result: np.ndarray[Any, Any] = shifted / shifted.sum()
    return result


def _penalized(scores: np.ndarray[Any, Any], context: list[int], reply: list[int],
               cfg: Sampling) -> np.ndarray[Any, Any]:
    if cfg.repetition_penalty != 1.0 and (context or reply):
        seen = np.unique(np.asarray(context + reply, dtype=np.int64))
        picked = scores[seen]
        scores = scores.copy()
        scores[seen] = np.where(picked > 0, picked / cfg.repetition_penalty,
                                picked * cfg.repetition_penalty)
    if (cfg.presence_penalty or cfg.frequency_penalty) and reply:
        ids, counts = np.unique(np.asarray(reply, dtype=np.int64), return_counts=True)
        scores = scores.copy()
        scores[ids] -= cfg.presence_penalty + cfg.frequency_penalty * counts
    return scores

"""Choosing the next token: penalties, temperature, top-k, top-p, as FastChat maps them.

Greedy below temperature 1e-5 or top_p 1e-8 (FastChat's thresholds). The repetition
penalty is CTRL's, over prompt and reply; presence and frequency penalties are OpenAI's,
over the reply only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
# scores costs ~5 ms per token on one core, the filter and a sort of what passes 0.2 ms.
NUCLEUS_FLOOR = 1e-4


def next_token(logits: torch.Tensor, context: list[int], reply: list[int], cfg: Sampling,
               generator: torch.Generator | None) -> int:
    """``logits``: the last position's scores (1-D). Returns the chosen token id."""
    scores = _penalized(logits.float(), context, reply, cfg)
    if cfg.greedy:
        return int(torch.argmax(scores))
    scores = scores / cfg.temperature
    size = scores.shape[-1]
    if 0 < cfg.top_k < size:
        values, ids = torch.topk(scores, cfg.top_k)  # sorted, most likely first
        probabilities = torch.softmax(values, dim=-1)
    elif cfg.top_p < 1.0:
        everything = torch.softmax(scores, dim=-1)
        ids = torch.nonzero(everything > NUCLEUS_FLOOR).squeeze(1)
        probabilities = everything[ids]
        if float(probabilities.sum()) < cfg.top_p:
            probabilities, ids = torch.sort(everything, descending=True)
        else:  # the likeliest tokens, exactly: all others are below the floor
            probabilities, order = torch.sort(probabilities, descending=True)
            ids = ids[order]
    else:
        cumulative = torch.softmax(scores, dim=-1).cumsum(dim=-1)
        draw = torch.rand(1, generator=generator) * cumulative[-1]
        return min(int(torch.searchsorted(cumulative, draw)), size - 1)
    if cfg.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        keep = probabilities.cumsum(dim=-1) - probabilities < cfg.top_p
        probabilities = probabilities[keep]
        ids = ids[keep]
    return int(ids[torch.multinomial(probabilities, 1, generator=generator)])


def _penalized(scores: torch.Tensor, context: list[int], reply: list[int],
               cfg: Sampling) -> torch.Tensor:
    if cfg.repetition_penalty != 1.0 and (context or reply):
        seen = torch.tensor(sorted(set(context) | set(reply)), dtype=torch.long)
        picked = scores[seen]
        scores = scores.clone()
        scores[seen] = torch.where(picked > 0, picked / cfg.repetition_penalty,
                                   picked * cfg.repetition_penalty)
    if (cfg.presence_penalty or cfg.frequency_penalty) and reply:
        ids, counts = torch.unique(torch.tensor(reply, dtype=torch.long), return_counts=True)
        scores = scores.clone()
        scores[ids] -= cfg.presence_penalty + cfg.frequency_penalty * counts.float()
    return scores

"""One request's reply as it grows, whatever engine computes the scores: choosing each token,
the stop checks (EOS and stop token ids, stop strings across tokens, max tokens), the text,
logprobs, and the FastChat frames (cumulative text) that go back to the gateway."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from app.protocol.stop_strings import TextTracker
from app.worker.detokenize import IncrementalText
from app.worker.sampling import Sampling, new_rng, next_token
from app.worker.structured.matchers import Constraint
from app.worker.structured.tool_calls import ToolCallParser
from schemas.worker import GenerationParams


@dataclass
class Timeline:
    """When a generation's stages happened (time.time()), for its trace: set by the
    engine, two clock reads a generation."""

    started: float = 0.0  # it got its row in the batch (or began, on transformers)
    prompt_done: float = 0.0  # the prompt is in the cache: the first token's scores
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    batch_peak: int = 1  # the most generations decoding together while it did


@dataclass
class Job:
    """One generation, checked and tokenized before it waits for a slot."""

    params: GenerationParams
    prompt: str
    input_ids: list[int]
    max_new_tokens: int
    constraint: Constraint | None = None  # the grammar the reply follows
    tool_calls: ToolCallParser | None = None  # finds the tool calls in the reply
    timeline: Timeline = field(default_factory=Timeline)


class Generation:
    def __init__(self, job: Job, tokenizer: Any, eos_ids: set[int],
                 stream_interval: int) -> None:
        params = job.params
        self.job = job
        self.sampling = Sampling.from_params(params)
        self.rng = new_rng(params["seed"])
        self.stop_ids = eos_ids | set(params["stop_token_ids"])
        self.stream_interval = stream_interval
        self.prefix = job.prompt if params["echo"] else ""
        self.tracker = TextTracker(params["stop"])
        self.detokenizer = IncrementalText(tokenizer)
        self.logprobs = Logprobs(tokenizer, params["logprobs"]) \
            if params["logprobs"] is not None else None
        self.constraint = job.constraint
        self.tool_calls = job.tool_calls
        self.reply: list[int] = []
        self.text = ""
        self.finish: str | None = None  # set once the reply is over

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.logprobs is not None and bool(self.job.params["echo"])

    def add_prompt_scores(self, logits: torch.Tensor) -> None:
        """Echoed logprobs: ``logits`` holds every prompt position's scores."""
        if self.wants_prompt_logprobs:
            assert self.logprobs is not None
            self.logprobs.add_prompt(self.job.input_ids, logits)

    def step(self, scores: torch.Tensor) -> dict[str, Any] | None:
        """Chooses the next token from the last position's ``scores``; returns a frame when
        one is due. Sets ``finish`` when the reply is over (the final frame is separate)."""
        constraint = self.constraint
        allowed = scores if constraint is None else self._masked(scores, constraint)
        token = next_token(allowed, self.job.input_ids, self.reply, self.sampling, self.rng)
        if token in self.stop_ids or (constraint is not None and token == constraint.eos):
            self.finish = "stop"
            return None
        self.reply.append(token)
        if self.logprobs is not None:
            self.logprobs.add(token, scores)
        self.text += self.tracker.feed(self.detokenizer.add(token))
        if self.tracker.stopped or (constraint is not None and constraint.advance(token)):
            self.finish = "stop"  # a stop string, or the grammar's end: nothing may follow
            return None
        if self.tool_calls is not None:
            repeat = self.tool_calls.repeated_call(self.text)
            if repeat is not None:  # never sent (a later call shows once complete)
                self.text = self.text[:repeat].rstrip()
                self.finish = "stop"
                return None
        if len(self.reply) >= self.job.max_new_tokens:
            self.finish = "length"
            return None
        if (len(self.reply) - 1) % self.stream_interval == 0:
            return self.frame(None)
        return None

    @staticmethod
    def _masked(scores: torch.Tensor, constraint: Constraint) -> torch.Tensor:
        """A copy of the scores with what the grammar forbids at -inf (the row itself
        stays as the model gave it, for logprobs)."""
        return torch.from_numpy(constraint.masked(scores.detach().float().cpu().numpy()))

    @property
    def last_token(self) -> int:
        return self.reply[-1]

    def final_frame(self) -> dict[str, Any]:
        if not self.tracker.stopped:
            self.text += self.tracker.feed(self.detokenizer.finish())
            self.text += self.tracker.flush()
        return self.frame(self.finish or "length")

    def frame(self, finish: str | None) -> dict[str, Any]:
        prompt_tokens = len(self.job.input_ids)
        generated = len(self.reply)
        frame: dict[str, Any] = {"text": self.prefix + self.text}
        if self.tool_calls is not None:
            # The text before any call, and the calls so far (flaskchat's protocol: each
            # frame carries them all, their arguments growing, as "text" grows).
            try:
                content, calls = self.tool_calls.parse(self.text, final=finish is not None)
            except Exception:  # noqa: BLE001 - the model's text, not a call
                content, calls = self.text, []
            frame = {"text": self.prefix + (content or ""), "tool_calls": calls}
            if calls and finish == "stop":
                finish = "tool_calls"
        frame.update({"error_code": 0,
                      "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                                "total_tokens": prompt_tokens + generated},
                      "finish_reason": finish,
                      "logprobs": self.logprobs.as_dict() if self.logprobs is not None
                      else None})
        return frame


class Logprobs:
    """FastChat's completion logprobs: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, tokenizer: Any, top: int) -> None:
        self.tokenizer = tokenizer
        self.top = top
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float]] = []
        self.text_offset: list[int] = []
        self._offset = 0

    def add_prompt(self, input_ids: list[int], logits: torch.Tensor) -> None:
        scores = torch.log_softmax(logits.float(), dim=-1)
        for position, token in enumerate(input_ids):
            value = None if position == 0 else float(scores[position - 1, token])
            self._append(token, value, {} if position == 0 else
                         self._alternatives(scores[position - 1]))

    def add(self, token: int, logits: torch.Tensor) -> None:
        scores = torch.log_softmax(logits.float(), dim=-1)
        self._append(token, float(scores[token]), self._alternatives(scores))

    def _alternatives(self, scores: torch.Tensor) -> dict[str, float]:
        if self.top <= 0:
            return {}
        values, ids = torch.topk(scores, min(self.top, scores.shape[-1]))
        return {self.tokenizer.decode([int(i)]): float(v) for v, i in zip(values, ids)}

    def _append(self, token: int, value: float | None, top: dict[str, float]) -> None:
        piece = self.tokenizer.decode([token])
        self.tokens.append(piece)
        self.token_logprobs.append(value)
        self.top_logprobs.append(top)
        self.text_offset.append(self._offset)
        self._offset += len(piece)

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "token_logprobs": list(self.token_logprobs),
                "top_logprobs": list(self.top_logprobs), "text_offset": list(self.text_offset)}

"""A causal language model behind the worker protocol: prompt building, the context-length
check, and the token loop that produces FastChat frames (cumulative text).

The loop is ours rather than ``model.generate`` so that it can stop within one token when
the client leaves, cut stop strings that arrive split across tokens, and report exact
usage and per-token logprobs.
"""
from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from app.protocol.error_codes import CONTEXT_OVERFLOW
from app.protocol.stop_strings import TextTracker
from app.worker.sampling import Sampling, next_token
from app.worker.templates import template_for
from schemas.messages import ChatMessage
from schemas.worker import GenerationParams

CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "max_seq_len",
                "model_max_length")


class PromptTooLong(ValueError):
    """The prompt leaves no room to generate (FastChat's CONTEXT_OVERFLOW, 40303)."""

    code = CONTEXT_OVERFLOW


@dataclass
class Job:
    """One generation, checked and tokenized before it waits for a slot."""

    params: GenerationParams
    prompt: str
    input_ids: list[int]
    max_new_tokens: int


class ChatModel:
    def __init__(self, model: Any, tokenizer: Any, conv_template: str = "",
                 stream_interval: int = 2) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.stream_interval = stream_interval
        self.context_length = context_length(model.config)
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None)) \
            and not conv_template
        self.conv = template_for(getattr(tokenizer, "chat_template", None), conv_template,
                                 self._default_system())
        self.eos_ids = _eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        # transformers 5 renamed past_key_values to cache (and warns on the old name).
        self._cache = "cache" if "cache" in inspect.signature(model.forward).parameters \
            else "past_key_values"

    # ---- preparing -------------------------------------------------------------------

    def prepare(self, params: GenerationParams) -> Job:
        """Renders and tokenizes; raises PromptTooLong before any slot is taken."""
        prompt = params["prompt"]
        if params["messages"] and self.has_chat_template:
            prompt = self.render(params["messages"])
        input_ids = self.encode(prompt)
        room = self.context_length - len(input_ids)
        if room <= 0 or not input_ids:
            raise PromptTooLong(
                f"This model's maximum context length is {self.context_length} tokens. "
                f"However, your messages resulted in {len(input_ids)} tokens. Please reduce "
                "the length of the messages.")
        return Job(params, prompt, input_ids, min(params["max_new_tokens"], room))

    def render(self, messages: list[ChatMessage]) -> str:
        plain = [{"role": m["role"], "content": m.get("content", "")} for m in messages]
        text: str = self.tokenizer.apply_chat_template(plain, tokenize=False,
                                                       add_generation_prompt=True)
        return text

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        return ids

    def _default_system(self) -> str:
        """The system text a ChatML chat template inserts when none is given."""
        try:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": "x"}],
                                                      tokenize=False)
        except Exception:
            return ""
        head = "<|im_start|>system\n"
        if isinstance(text, str) and text.startswith(head) and "<|im_end|>" in text:
            return text[len(head):text.index("<|im_end|>")]
        return ""

    # ---- generating ---------------------------------------------------------------------

    def generate(self, job: Job, cancel: threading.Event) -> Iterator[dict[str, Any]]:
        """FastChat frames: cumulative text, every ``stream_interval`` tokens, then a final
        frame with finish_reason. Returns early (no final frame) once ``cancel`` is set."""
        params = job.params
        sampling = Sampling.from_params(params)
        generator = torch.Generator().manual_seed(params["seed"]) \
            if params["seed"] is not None else None
        stop_ids = self.eos_ids | set(params["stop_token_ids"])
        prefix = job.prompt if params["echo"] else ""
        tracker = TextTracker(params["stop"])
        logprobs = _Logprobs(self.tokenizer, params["logprobs"]) \
            if params["logprobs"] is not None else None
        reply: list[int] = []
        text = ""
        finish = "length"
        with torch.inference_mode():
            output = self.model(input_ids=torch.tensor([job.input_ids], device=self.device),
                                use_cache=True)
            if logprobs is not None and params["echo"]:
                logprobs.add_prompt(job.input_ids, output.logits[0])
            for step in range(job.max_new_tokens):
                if cancel.is_set():
                    return
                scores = output.logits[0, -1]
                token = next_token(scores, job.input_ids, reply, sampling, generator)
                if token in stop_ids:
                    finish = "stop"
                    break
                reply.append(token)
                if logprobs is not None:
                    logprobs.add(token, scores)
                text += tracker.feed(self.tokenizer.decode(reply, skip_special_tokens=True))
                if tracker.stopped:
                    finish = "stop"
                    break
                if step % self.stream_interval == 0:
                    yield self._frame(prefix + text, job, len(reply), None, logprobs)
                output = self.model(input_ids=torch.tensor([[token]], device=self.device),
                                    use_cache=True, **{self._cache: output[self._cache]})
        if not tracker.stopped:
            text += tracker.flush()
        yield self._frame(prefix + text, job, len(reply), finish, logprobs)

    def _frame(self, text: str, job: Job, generated: int, finish: str | None,
               logprobs: "_Logprobs | None") -> dict[str, Any]:
        prompt_tokens = len(job.input_ids)
        return {"text": text, "error_code": 0,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                          "total_tokens": prompt_tokens + generated},
                "finish_reason": finish,
                "logprobs": logprobs.as_dict() if logprobs is not None else None}


class _Logprobs:
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
        values, ids = torch.topk(scores, self.top)
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


def context_length(config: Any) -> int:
    """As FastChat: the first length key found, times the rope-scaling factor; else 2048."""
    factor = 1.0
    rope = getattr(config, "rope_scaling", None)
    if isinstance(rope, dict) and rope.get("factor"):
        factor = float(rope["factor"])
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return int(value * factor)
    return 2048


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids

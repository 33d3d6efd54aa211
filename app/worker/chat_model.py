"""A chat model behind the worker protocol, whatever engine runs it: prompt building, the
context-length check, the sampling defaults, and one Generation per request."""
from __future__ import annotations

import threading
from typing import Any, Iterator, Protocol

from app.errors import InvalidRequest
from app.protocol.error_codes import CONTEXT_OVERFLOW
from app.worker.generation import Generation, Job
from app.worker.structured.planning import StructuredOutputs
from app.worker.structured.tool_prompt import template_messages, template_tools_of
from app.worker.templates import template_for
from schemas.messages import ChatMessage
from schemas.worker import GenerationParams

CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "max_seq_len",
                "model_max_length")
# FastChat's worker defaults, for what neither the request nor the model sets
FASTCHAT_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1}


class PromptTooLong(ValueError):
    """The prompt leaves no room to generate (FastChat's CONTEXT_OVERFLOW, 40303)."""

    code = CONTEXT_OVERFLOW


class Engine(Protocol):
    """What computes the scores: app.worker.torch_engine or app.worker.onnx_engine."""

    name: str
    config: Any  # the transformers config
    generation_config: Any
    context_length: int
    summary: str  # for the log line when loaded

    def generate(self, generation: Generation,
                 cancel: threading.Event) -> Iterator[dict[str, Any]]: ...


class ChatModel:
    def __init__(self, engine: Engine, tokenizer: Any, conv_template: str = "",
                 stream_interval: int = 2,
                 sampling_defaults: dict[str, float] | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.stream_interval = stream_interval
        self.context_length = engine.context_length
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None)) \
            and not conv_template
        self.conv = template_for(getattr(tokenizer, "chat_template", None), conv_template,
                                 self._default_system())
        self.eos_ids = _eos_ids(engine, tokenizer)
        self.structured = StructuredOutputs(tokenizer, _vocabulary(engine, tokenizer),
                                            _grammar_eos(self.eos_ids, tokenizer))
        # what an omitted temperature / top_p / top_k means: the model's own values first
        self.sampling_defaults = {**FASTCHAT_SAMPLING, **(sampling_defaults or {})}

    # ---- preparing -------------------------------------------------------------------

    def prepare(self, params: GenerationParams) -> Job:
        """Renders and tokenizes; raises PromptTooLong before any slot is taken."""
        for name, value in self.sampling_defaults.items():
            if params.get(name) is None:
                params[name] = value  # type: ignore[literal-required]
        plan = self.structured.plan(params)
        prompt = params["prompt"]
        if params["messages"] and self.has_chat_template:
            prompt = self.render(params["messages"], plan.tools)
        input_ids = self.encode(prompt)
        room = self.context_length - len(input_ids)
        if room <= 0 or not input_ids:
            raise PromptTooLong(
                f"This model's maximum context length is {self.context_length} tokens. "
                f"However, your messages resulted in {len(input_ids)} tokens. Please reduce "
                "the length of the messages.")
        # Compiled only for a prompt that fits: a grammar may cost milliseconds.
        return Job(params, prompt, input_ids, min(params["max_new_tokens"], room),
                   self.structured.constraint(plan), plan.tool_parser())

    def render(self, messages: list[ChatMessage],
               tools: list[dict[str, Any]] | None = None) -> str:
        renders_tools = self.structured.renders_tools
        shown = template_messages([dict(m) for m in messages], tools, renders_tools)
        extra = {"tools": template_tools_of(tools)} if tools and renders_tools else {}
        try:
            text: str = self.tokenizer.apply_chat_template(
                shown, tokenize=False, add_generation_prompt=True, **extra)
        except Exception as exc:  # noqa: BLE001 - the template refused these messages
            raise InvalidRequest(f"The model's chat template cannot render these messages: "
                                 f"{type(exc).__name__}: {str(exc)[:300]}",
                                 "tools" if extra else "messages") from None
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
        generation = Generation(job, self.tokenizer, self.eos_ids, self.stream_interval)
        return self.engine.generate(generation, cancel)


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


def _vocabulary(engine: Engine, tokenizer: Any) -> int:
    """How many scores a step gives: the model's vocabulary (it may pad the tokenizer's)."""
    size = getattr(engine.config, "vocab_size", None)
    return int(size) if isinstance(size, int) and size > 0 else len(tokenizer)


def _grammar_eos(eos_ids: set[int], tokenizer: Any) -> int:
    """The token that ends a constrained reply: the model's EOS, else its template's end
    of turn, else its first special token (a model without an EOS)."""
    if eos_ids:
        return min(eos_ids)
    for token in ("<|im_end|>", "<|eot_id|>", "</s>"):
        found = tokenizer.convert_tokens_to_ids(token)
        if isinstance(found, int) and found != tokenizer.unk_token_id and found >= 0:
            return found
    specials = getattr(tokenizer, "all_special_ids", None) or [0]
    return int(specials[0])


def _eos_ids(engine: Engine, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (engine.generation_config, engine.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids

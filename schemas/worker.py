"""Bodies the model worker accepts (FastChat's worker protocol, plus ``messages``)."""
from __future__ import annotations

from typing import Any, TypedDict

from marshmallow import EXCLUDE, Schema, fields, post_load

from schemas.fields import Bool, Int, Number, Stop, Str, TextInputs, at_least
from schemas.messages import ChatMessage, Messages
from schemas.tools import StructuredFields


class GenerationParams(TypedDict):
    prompt: str
    messages: list[ChatMessage] | None
    temperature: float | None  # None: the model's default (the worker fills it in)
    top_p: float | None
    top_k: int | None
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    max_new_tokens: int
    stop: list[str]
    stop_token_ids: list[int]
    echo: bool
    logprobs: int | None
    seed: int | None
    # flaskchat's structured outputs (capabilities "response_format", "tools", "guided")
    response_format: dict[str, Any] | None
    tools: list[dict[str, Any]] | None
    tool_choice: Any
    parallel_tool_calls: bool | None
    guided_json: Any
    guided_regex: str | None
    guided_choice: list[str] | None


class GenerationSchema(StructuredFields):
    """FastChat's defaults when a key is absent; a null means the default too (FastChat's
    worker crashes on a null temperature). An absent temperature, top_p or top_k stays None:
    the worker uses the model's own defaults (generation_config.json), then FastChat's."""

    class Meta:
        unknown = EXCLUDE

    DEFAULTS: dict[str, Any] = {
        "prompt": "", "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
        "max_new_tokens": 256, "stop": [], "stop_token_ids": [],
        "echo": True,  # FastChat's worker echoes unless told not to
    }

    prompt = Str(allow_none=True, load_default=None)
    messages = Messages(allow_none=True, load_default=None)
    temperature = Number(allow_none=True, load_default=None, validate=at_least(0, "temperature"))
    top_p = Number(allow_none=True, load_default=None, validate=at_least(0, "top_p"))
    top_k = Int(allow_none=True, load_default=None)
    repetition_penalty = Number(allow_none=True, load_default=None,
                                validate=at_least(0, "repetition_penalty"))
    presence_penalty = Number(allow_none=True, load_default=None)
    frequency_penalty = Number(allow_none=True, load_default=None)
    max_new_tokens = Int(allow_none=True, load_default=None,
                         validate=at_least(1, "max_new_tokens"))
    stop = Stop(allow_none=True, load_default=None)
    stop_token_ids = fields.List(Int(), allow_none=True, load_default=None)
    echo = Bool(allow_none=True, load_default=None)
    logprobs = Int(allow_none=True, load_default=None, validate=at_least(0, "logprobs"))
    seed = Int(allow_none=True, load_default=None)

    @post_load
    def _defaults(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        for name, default in self.DEFAULTS.items():
            if data.get(name) is None:
                data[name] = default
        if isinstance(data.get("messages"), str):  # a raw prompt given as messages
            data["prompt"], data["messages"] = data["messages"], None
        return data


class EmbeddingParams(TypedDict):
    input: list[str]
    encoding_format: str | None


class WorkerEmbeddingSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    input = TextInputs("input", required=True)
    encoding_format = Str(allow_none=True, load_default=None)


class PromptSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    prompt = Str(load_default="")

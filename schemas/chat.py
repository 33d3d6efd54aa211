"""POST /v1/chat/completions and FastChat's /api/v1/chat/completions."""
from __future__ import annotations

from typing import Any

from marshmallow import ValidationError, fields, post_load, validates_schema

from schemas.fields import Bool, Int, Number, at_least, between
from schemas.messages import ChatMessage, Messages
from schemas.sampling import SamplingRequest, SamplingSchema, check_best_of
from schemas.tools import Functions, StructuredFields


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] | str  # a string is a raw prompt (FastChat extension)
    tools: list[dict[str, Any]] | None
    functions: list[dict[str, Any]] | None  # deprecated form of tools
    tool_choice: Any
    response_format: dict[str, Any] | None
    parallel_tool_calls: bool | None
    # vLLM's guided decoding, which its users send through the openai client's extra_body
    guided_json: Any
    guided_regex: str | None
    guided_choice: list[str] | None
    logprobs: bool
    top_logprobs: int | None
    best_of: int | None  # an extension some upstreams (vLLM) take: candidates per prompt


class ChatSchema(SamplingSchema, StructuredFields):
    messages = Messages(required=True)
    functions = Functions(allow_none=True, load_default=None)
    function_call = fields.Raw(allow_none=True, load_default=None)
    logprobs = Bool(allow_none=True, load_default=None)
    top_logprobs = Int(allow_none=True, load_default=None, validate=between(0, 20, "top_logprobs"))
    best_of = Int(allow_none=True, load_default=None, validate=at_least(1, "best_of"))

    def __init__(self, *, max_messages: int = 2048, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_messages = max_messages

    @validates_schema
    def _check_message_count(self, data: dict[str, Any], **kwargs: Any) -> None:
        messages = data.get("messages")
        if isinstance(messages, list) and len(messages) > self.max_messages:
            raise ValidationError(f"{len(messages)} messages is more than the maximum of "
                                  f"{self.max_messages} - 'messages'", "messages")
        if data.get("top_logprobs") is not None and not data.get("logprobs"):
            raise ValidationError("top_logprobs needs logprobs set to true", "top_logprobs")
        check_best_of(data, self.max_n)
    # OpenAI's newer name for max_tokens; it wins when both are sent.
    max_completion_tokens = Int(allow_none=True, load_default=None,
                                validate=at_least(1, "max_completion_tokens"))

    @post_load
    def _prefer_max_completion_tokens(self, data: dict[str, Any],
                                      **kwargs: Any) -> dict[str, Any]:
        preferred = data.pop("max_completion_tokens", None)
        if preferred is not None:
            data["max_tokens"] = preferred
        data["logprobs"] = bool(data.get("logprobs"))
        data.pop("function_call", None)
        return data


class ApiChatSchema(ChatSchema):
    """FastChat's /api/v1/chat/completions: chat plus repetition_penalty (default 1.0)."""

    repetition_penalty = Number(allow_none=True, load_default=1.0,
                                validate=at_least(0, "repetition_penalty"))

"""POST /v1/chat/completions and FastChat's /api/v1/chat/completions."""
from __future__ import annotations

from typing import Any

from marshmallow import ValidationError, post_load, validates_schema

from schemas.fields import Int, Number, at_least
from schemas.messages import ChatMessage, Messages
from schemas.sampling import SamplingRequest, SamplingSchema


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] | str  # a string is a raw prompt (FastChat extension)


class ChatSchema(SamplingSchema):
    messages = Messages(required=True)

    def __init__(self, *, max_messages: int = 2048, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_messages = max_messages

    @validates_schema
    def _check_message_count(self, data: dict[str, Any], **kwargs: Any) -> None:
        messages = data.get("messages")
        if isinstance(messages, list) and len(messages) > self.max_messages:
            raise ValidationError(f"{len(messages)} messages is more than the maximum of "
                                  f"{self.max_messages} - 'messages'", "messages")
    # OpenAI's newer name for max_tokens; it wins when both are sent.
    max_completion_tokens = Int(allow_none=True, load_default=None,
                                validate=at_least(1, "max_completion_tokens"))

    @post_load
    def _prefer_max_completion_tokens(self, data: dict[str, Any],
                                      **kwargs: Any) -> dict[str, Any]:
        preferred = data.pop("max_completion_tokens", None)
        if preferred is not None:
            data["max_tokens"] = preferred
        return data


class ApiChatSchema(ChatSchema):
    """FastChat's /api/v1/chat/completions: chat plus repetition_penalty (default 1.0)."""

    repetition_penalty = Number(allow_none=True, load_default=1.0,
                                validate=at_least(0, "repetition_penalty"))

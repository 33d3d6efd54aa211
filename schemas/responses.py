"""POST /v1/responses: the top-level fields. The items of ``input`` and ``tools`` are read
by ``app.responses.translate``, which knows what each kind becomes on the chat path."""
from __future__ import annotations

from typing import Any, Mapping, TypedDict

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validates_schema

from schemas.fields import (Bool, Int, Number, Str, at_least, at_most_chars, between,
                            service_tier)


class ResponsesRequest(TypedDict):
    model: str
    input: str | list[Any]
    instructions: str | None
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    stream: bool
    tools: list[Any] | None
    tool_choice: Any
    parallel_tool_calls: bool | None
    text: dict[str, Any] | None
    metadata: dict[str, str] | None
    user: str | None
    safety_identifier: str | None
    service_tier: str | None
    prompt_cache_key: str | None
    store: bool | None
    previous_response_id: str | None
    background: bool | None
    reasoning: dict[str, Any] | None
    include: list[Any] | None
    truncation: str | None
    conversation: Any
    prompt: Any
    top_logprobs: Any


class Input(fields.Field[Any]):
    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> Any:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:
            return value
        raise ValidationError("must be a string or a non-empty list of input items")


class Metadata(fields.Field[dict[str, str]]):
    """OpenAI's rule: at most 16 pairs, keys up to 64 characters, values up to 512."""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> dict[str, str]:
        if not isinstance(value, dict) or len(value) > 16 or not all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                for k, v in value.items()):
            raise ValidationError("must be an object of at most 16 string pairs (keys up to "
                                  "64 characters, values up to 512)")
        return value


class JsonObject(fields.Field[dict[str, Any]]):
    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ValidationError("must be an object")
        return value


class JsonList(fields.Field[list[Any]]):
    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> list[Any]:
        if not isinstance(value, list):
            raise ValidationError("must be an array")
        return value


REFUSED = {"description": "Not supported: a request that sets it is a 400 naming it."}


class ResponsesSchema(Schema):
    class Meta:
        unknown = EXCLUDE  # as elsewhere: fields we do not know are ignored

    model = Str(required=True)
    input = Input(required=True)
    instructions = Str(allow_none=True, load_default=None)
    max_output_tokens = Int(allow_none=True, load_default=None,
                            validate=at_least(1, "max_output_tokens"))
    temperature = Number(allow_none=True, load_default=None,
                         validate=between(0, 2, "temperature"))
    top_p = Number(allow_none=True, load_default=None, validate=between(0, 1, "top_p"))
    stream = Bool(allow_none=True, load_default=False)
    tools = JsonList(allow_none=True, load_default=None)
    tool_choice = fields.Raw(allow_none=True, load_default=None)
    parallel_tool_calls = Bool(allow_none=True, load_default=None)
    text = JsonObject(allow_none=True, load_default=None)
    metadata = Metadata(allow_none=True, load_default=None)
    # Stored and echoed: bounded as OpenAI bounds them.
    user = Str(allow_none=True, load_default=None, validate=at_most_chars(256, "user"))
    safety_identifier = Str(allow_none=True, load_default=None,
                            validate=at_most_chars(64, "safety_identifier"))
    service_tier = Str(allow_none=True, load_default=None, validate=service_tier)
    prompt_cache_key = Str(allow_none=True, load_default=None,
                           validate=at_most_chars(64, "prompt_cache_key"))
    store = Bool(allow_none=True, load_default=None)  # None: stored, as OpenAI's default
    previous_response_id = Str(allow_none=True, load_default=None)
    background = Bool(allow_none=True, load_default=None)
    reasoning = JsonObject(allow_none=True, load_default=None)
    include = JsonList(allow_none=True, load_default=None)
    truncation = Str(allow_none=True, load_default=None)
    # Read only to be refused (app.responses.translate.refuse_unsupported): ignored, each
    # would change the answer without the client knowing.
    conversation = fields.Raw(allow_none=True, load_default=None, metadata=REFUSED)
    prompt = fields.Raw(allow_none=True, load_default=None, metadata=REFUSED)
    top_logprobs = fields.Raw(allow_none=True, load_default=None, metadata=REFUSED)

    def __init__(self, *, max_tokens_limit: int = 1_048_576, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_tokens_limit = max_tokens_limit

    @validates_schema
    def _check_limits(self, data: dict[str, Any], **kwargs: Any) -> None:
        value = data.get("max_output_tokens")
        if value is not None and value > self.max_tokens_limit:
            raise ValidationError(f"{value} is greater than the maximum of "
                                  f"{self.max_tokens_limit} - 'max_output_tokens'",
                                  "max_output_tokens")

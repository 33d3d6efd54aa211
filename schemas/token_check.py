"""FastChat's POST /api/v1/token_check."""
from __future__ import annotations

from typing import Any, TypedDict

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validates_schema

from schemas.fields import Int, Str, at_least


class TokenCheckItem(TypedDict):
    model: str
    prompt: str
    max_tokens: int


class TokenCheckRequest(TypedDict):
    prompts: list[TokenCheckItem]


class TokenCheckItemSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    model = Str(required=True)
    prompt = Str(required=True)
    max_tokens = Int(required=True, validate=at_least(0, "max_tokens"))


class TokenCheckSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    prompts = fields.List(fields.Nested(TokenCheckItemSchema), required=True)

    def __init__(self, *, max_inputs: int = 2048, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_inputs = max_inputs

    @validates_schema
    def _check_size(self, data: dict[str, Any], **kwargs: Any) -> None:
        if len(data.get("prompts", ())) > self.max_inputs:
            raise ValidationError(f"prompts has more than {self.max_inputs} items", "prompts")

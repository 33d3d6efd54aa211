"""POST /v1/embeddings and /v1/engines/{model}/embeddings."""
from __future__ import annotations

from typing import Any, TypedDict

from marshmallow import EXCLUDE, Schema, ValidationError, post_load, validates_schema

from schemas.fields import Str, TextInputs

ENCODING_FORMATS = ("float", "base64")


class EmbeddingRequest(TypedDict):
    model: str | None  # None: the engine named in the path
    input: list[str]
    encoding_format: str


def _encoding_format(value: str) -> None:
    if value not in ENCODING_FORMATS:
        raise ValidationError(f"{value!r} is not one of 'float', 'base64' - 'encoding_format'")


class EmbeddingSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    model = Str(allow_none=True, load_default=None)
    input = TextInputs("input", allow_empty=False, required=True)
    encoding_format = Str(allow_none=True, load_default=None, validate=_encoding_format)
    user = Str(allow_none=True, load_default=None)

    def __init__(self, *, max_inputs: int = 2048, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_inputs = max_inputs

    @validates_schema
    def _check_size(self, data: dict[str, Any], **kwargs: Any) -> None:
        if len(data.get("input", ())) > self.max_inputs:
            raise ValidationError(f"input has more than {self.max_inputs} items", "input")

    @post_load
    def _defaults(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        data["encoding_format"] = data.get("encoding_format") or "float"
        data.pop("user", None)
        return data

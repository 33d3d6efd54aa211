"""POST /v1/completions."""
from __future__ import annotations

from typing import Any

from marshmallow import ValidationError, post_load, validates_schema

from schemas.fields import Bool, Int, Str, TextInputs, at_least, between
from schemas.sampling import SamplingRequest, SamplingSchema, check_best_of
from schemas.tools import GuidedFields


class CompletionRequest(SamplingRequest):
    prompt: list[str]
    echo: bool
    logprobs: int | None
    best_of: int | None
    use_beam_search: bool | None
    guided_json: Any
    guided_regex: str | None
    guided_choice: list[str] | None


class CompletionSchema(SamplingSchema, GuidedFields):
    prompt = TextInputs("prompt", required=True)
    echo = Bool(allow_none=True, load_default=None)
    logprobs = Int(allow_none=True, load_default=None, validate=between(0, 20, "logprobs"))
    best_of = Int(allow_none=True, load_default=None, validate=at_least(1, "best_of"))
    use_beam_search = Bool(allow_none=True, load_default=None)
    suffix = Str(allow_none=True, load_default=None)

    def __init__(self, *, max_inputs: int = 2048, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_inputs = max_inputs

    @validates_schema
    def _check_completion_rules(self, data: dict[str, Any], **kwargs: Any) -> None:
        if len(data.get("prompt", ())) > self.max_inputs:
            raise ValidationError(f"prompt has more than {self.max_inputs} items", "prompt")
        check_best_of(data, self.max_n)
        if data.get("suffix"):
            raise ValidationError("suffix is not supported by this server", "suffix")

    @post_load
    def _completion_defaults(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        if data.get("max_tokens") is None:
            data["max_tokens"] = 16  # OpenAI's and FastChat's default for completions
        data["echo"] = bool(data.get("echo"))
        data.pop("suffix", None)
        return data

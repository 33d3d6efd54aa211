"""Fields shared by chat and text completions: model, sampling, limits, streaming."""
from __future__ import annotations

from typing import Any, TypedDict

from marshmallow import (EXCLUDE, Schema, ValidationError, fields, post_load,
                         validates_schema)

from schemas.fields import (Bool, Int, Number, Stop, Str, at_least, between, service_tier,
                            top_k_rule)


class SamplingRequest(TypedDict):
    model: str
    max_tokens: int | None  # None: as many as the context allows
    n: int
    temperature: float | None  # None: the model's default (see sampling_params)
    top_p: float | None
    top_k: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float | None  # FastChat's /api/v1 extension
    seed: int | None
    service_tier: str | None  # as asked; the tier served is the Call's


class StreamOptionsSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    include_usage = Bool(allow_none=True, load_default=False)


def check_best_of(data: dict[str, Any], max_n: int) -> None:
    """best_of candidates are generated for each prompt: at least n, at most --max-n."""
    best_of = data.get("best_of")
    if best_of is None:
        return
    if best_of < (data.get("n") or 1):
        raise ValidationError("best_of must be greater than or equal to n", "best_of")
    if best_of > max_n:
        raise ValidationError(f"{best_of} is greater than the maximum of {max_n} - "
                              "'best_of'", "best_of")


def generations(n: int, best_of: int | None) -> int:
    """How many sequences a prompt makes: its n choices, or its best_of candidates."""
    return max(n, best_of or 0)


def _model_name(value: str) -> None:
    if not value.strip():
        raise ValidationError("must be a non-empty model name")


class SamplingSchema(Schema):
    """Validation as FastChat's check_requests, plus nulls meaning "the default"."""

    class Meta:
        unknown = EXCLUDE

    DEFAULTS: dict[str, Any] = {
        "n": 1, "stop": [], "stream": False,
        "presence_penalty": 0.0, "frequency_penalty": 0.0,
    }

    model = Str(required=True, validate=_model_name)
    max_tokens = Int(allow_none=True, load_default=None, validate=at_least(1, "max_tokens"))
    n = Int(allow_none=True, load_default=None, validate=at_least(1, "n"))
    temperature = Number(allow_none=True, load_default=None,
                         validate=between(0, 2, "temperature"))
    top_p = Number(allow_none=True, load_default=None, validate=between(0, 1, "top_p"))
    top_k = Int(allow_none=True, load_default=None, validate=top_k_rule)
    stop = Stop(allow_none=True, load_default=None)
    stream = Bool(allow_none=True, load_default=None)
    stream_options = fields.Nested(StreamOptionsSchema, allow_none=True, load_default=None)
    presence_penalty = Number(allow_none=True, load_default=None,
                              validate=between(-2, 2, "presence_penalty"))
    frequency_penalty = Number(allow_none=True, load_default=None,
                               validate=between(-2, 2, "frequency_penalty"))
    seed = Int(allow_none=True, load_default=None)
    user = Str(allow_none=True, load_default=None)
    service_tier = Str(allow_none=True, load_default=None, validate=service_tier)

    def __init__(self, *, max_n: int = 128, max_tokens_limit: int = 1_048_576,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_n = max_n
        self.max_tokens_limit = max_tokens_limit

    @validates_schema
    def _check_limits(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("n") is not None and data["n"] > self.max_n:
            raise ValidationError(f"{data['n']} is greater than the maximum of "
                                  f"{self.max_n} - 'n'", "n")
        for name in ("max_tokens", "max_completion_tokens"):
            value = data.get(name)
            if value is not None and value > self.max_tokens_limit:
                raise ValidationError(f"{value} is greater than the maximum of "
                                      f"{self.max_tokens_limit} - '{name}'", name)
        if data.get("stream_options") is not None and not data.get("stream"):
            raise ValidationError("stream_options is only allowed when stream is true",
                                  "stream_options")

    @post_load
    def _fill_defaults(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        for name, default in self.DEFAULTS.items():
            if data.get(name) is None:
                data[name] = default
        options = data.pop("stream_options", None) or {}
        data["include_usage"] = bool(options.get("include_usage"))
        data.setdefault("repetition_penalty", None)
        data.pop("user", None)
        return data

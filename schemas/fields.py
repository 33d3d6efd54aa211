"""Field types shared by the request schemas.

Numbers are read leniently, as FastChat's pydantic models do ("0.5" is 0.5), but booleans
are never numbers. Range messages use FastChat's wording, which names the parameter.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from marshmallow import ValidationError, fields


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


class Number(fields.Field[float]):
    """A finite number; strings that hold one are accepted."""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> float:
        if _is_bool(value) or not isinstance(value, (int, float, str)):
            raise ValidationError("must be a number")
        try:
            number = float(value)
        except (ValueError, OverflowError):
            raise ValidationError("must be a number") from None
        if not math.isfinite(number):
            raise ValidationError("must be a finite number")
        return number


INT64 = (-2**63, 2**63 - 1)  # what a worker or an upstream can take (and orjson can send)


class Int(fields.Field[int]):
    """A 64-bit integer; integral floats (3.0) and integer strings ("3") are accepted."""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> int:
        number = _integer(value)
        if number is None:
            raise ValidationError("must be an integer")
        if not INT64[0] <= number <= INT64[1]:
            raise ValidationError("must be a 64-bit integer")
        return number


def _integer(value: Any) -> int | None:
    if _is_bool(value):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


class Bool(fields.Field[bool]):
    """A JSON boolean; nothing else (a string "false" is an error, not True)."""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise ValidationError("must be a boolean")
        return value


class Str(fields.Field[str]):
    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> str:
        if not isinstance(value, str):
            raise ValidationError("must be a string")
        return value


class Stop(fields.Field[list[str]]):
    """A string or a list of strings, returned as a list without empty strings."""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> list[str]:
        if isinstance(value, str):
            return [value] if value else []
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return [item for item in value if item]
        raise ValidationError(f"{value!r} is not valid under any of the given schemas "
                              "- 'stop' (expected a string or a list of strings)")


class TextInputs(fields.Field[list[str]]):
    """A string or a non-empty list of strings (prompts, embedding inputs).

    Token-id arrays are refused: FastChat decodes them with an OpenAI tokenizer, which
    means nothing to a local model. With ``allow_empty=False`` (embedding inputs, as
    OpenAI has it) no string may be empty.
    """

    def __init__(self, what: str, allow_empty: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.what = what
        self.allow_empty = allow_empty

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> list[str]:
        if isinstance(value, str):
            value = [value]
        elif not isinstance(value, list):
            raise ValidationError(f"{self.what} must be a string or a list of strings")
        if not value:
            raise ValidationError(f"{self.what} must not be an empty list")
        if all(isinstance(item, str) for item in value):
            if not self.allow_empty and not all(value):
                where = "" if len(value) == 1 else f" (item {value.index('')})"
                raise ValidationError(f"{self.what} must not be an empty string{where}")
            return list(value)
        if all(isinstance(item, int) or isinstance(item, list) for item in value):
            raise ValidationError(
                f"{self.what} as token ids is not supported by this server: token ids "
                "depend on the model's tokenizer. Send text instead.")
        raise ValidationError(f"{self.what} must be a string or a list of strings")


def at_least(minimum: float, name: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value is not None and value < minimum:
            raise ValidationError(f"{_show(value)} is less than the minimum of "
                                  f"{_show(minimum)} - '{name}'")
    return check


def between(low: float, high: float, name: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value is None:
            return
        if value < low:
            raise ValidationError(f"{_show(value)} is less than the minimum of "
                                  f"{_show(low)} - '{name}'")
        if value > high:
            raise ValidationError(f"{_show(value)} is greater than the maximum of "
                                  f"{_show(high)} - '{name}'")
    return check


def at_most(maximum: float, name: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value is not None and value > maximum:
            raise ValidationError(f"{_show(value)} is greater than the maximum of "
                                  f"{_show(maximum)} - '{name}'")
    return check


def at_most_chars(maximum: int, name: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value is not None and len(value) > maximum:
            raise ValidationError(f"string too long: expected at most {maximum} "
                                  f"characters, got {len(value)} - '{name}'")
    return check


def top_k_rule(value: Any) -> None:
    if value is not None and -1 < value < 1:
        raise ValidationError(f"{value} is out of Range. Either set top_k to -1 or >=1.")


def _show(value: float) -> str:
    return str(int(value)) if isinstance(value, int) else str(float(value))


SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority")  # as OpenAI accepts them


def service_tier(value: Any) -> None:
    if value is not None and value not in SERVICE_TIERS:
        raise ValidationError(f"{value!r} is not one of {', '.join(SERVICE_TIERS)} - "
                              "'service_tier'")

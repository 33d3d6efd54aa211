"""Runs a marshmallow schema and turns its first error into an InvalidRequest with `param`."""
from __future__ import annotations

from typing import Any, Mapping

from marshmallow import Schema, ValidationError

from app.errors import InvalidRequest, ParamOutOfRange

_RANGE_WORDS = ("less than the minimum", "greater than the maximum", "out of Range")
_MISSING = "Missing data for required field."


def load(schema: Schema, payload: Mapping[str, Any]) -> Any:
    try:
        return schema.load(payload)
    except ValidationError as exc:
        param, message = first_error(exc.messages)
        raise _as_request_error(param, message) from None


def first_error(messages: Any, path: str = "") -> tuple[str | None, str]:
    """The path (``messages[0].content[1].type``) and text of the first error."""
    if isinstance(messages, dict) and messages:
        key, nested = next(iter(messages.items()))
        if key == "_schema":
            return first_error(nested, path)
        if isinstance(key, int):
            child = f"{path}[{key}]"
        else:
            child = f"{path}.{key}" if path else str(key)
        return first_error(nested, child)
    if isinstance(messages, list) and messages:
        return first_error(messages[0], path)
    return (path or None), str(messages)


def _as_request_error(param: str | None, message: str) -> InvalidRequest:
    if message == _MISSING:
        return InvalidRequest(f"Missing required parameter: '{param}'.", param)
    if any(words in message for words in _RANGE_WORDS):
        return ParamOutOfRange(message, param)
    if param is None:
        return InvalidRequest(message)
    return InvalidRequest(f"Invalid '{param}': {message}", param)

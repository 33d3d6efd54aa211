"""Chat messages: validated and normalized into one flat shape.

Every message comes out as ``{"role", "content"}`` with ``content`` a string; text parts
are joined with newlines, image parts are collected in ``images``. ``developer`` becomes
``system`` and the legacy ``function`` role becomes ``tool``; any other role is an error.
"""
from __future__ import annotations

from typing import Any, Mapping, TypedDict

from marshmallow import ValidationError, fields

ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user",
                "assistant": "assistant", "tool": "tool", "function": "tool"}


class ToolCallFunction(TypedDict):
    name: str
    arguments: str


class ToolCall(TypedDict):
    id: str
    type: str
    function: ToolCallFunction


class ChatMessage(TypedDict, total=False):
    role: str  # system | user | assistant | tool
    content: str
    images: list[str]  # image URLs or data: URLs, in the order given
    name: str
    tool_calls: list[ToolCall]
    tool_call_id: str


class Messages(fields.Field[list[ChatMessage] | str]):
    """A non-empty list of messages, or (FastChat extension) one raw prompt string."""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> list[ChatMessage] | str:
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValidationError("must be a list of message objects")
        if not value:
            raise ValidationError("must contain at least one message")
        errors: dict[int, Any] = {}
        messages: list[ChatMessage] = []
        for index, item in enumerate(value):
            try:
                messages.append(_message(item))
            except ValidationError as exc:
                errors[index] = exc.messages
        if errors:
            raise ValidationError(errors)
        return messages


def _message(item: Any) -> ChatMessage:
    if not isinstance(item, dict):
        raise ValidationError("must be a message object with 'role' and 'content'")
    role = item.get("role")
    if not isinstance(role, str):
        raise ValidationError({"role": ["is required and must be a string"]})
    if role not in ROLE_ALIASES:
        raise ValidationError({"role": [
            f"{role!r} is not a supported role; use system, developer, user, assistant "
            "or tool"]})
    message: ChatMessage = {"role": ROLE_ALIASES[role]}
    text, images = _content(item.get("content"))
    message["content"] = text
    if images:
        message["images"] = images
    if item.get("name") is not None:
        message["name"] = _string(item, "name")
    if item.get("tool_call_id") is not None:
        message["tool_call_id"] = _string(item, "tool_call_id")
    if item.get("tool_calls") is not None:
        message["tool_calls"] = _tool_calls(item["tool_calls"])
    return message


def _string(item: dict[str, Any], key: str) -> str:
    value = item[key]
    if not isinstance(value, str):
        raise ValidationError({key: ["must be a string"]})
    return value


def _content(content: Any) -> tuple[str, list[str]]:
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ValidationError({"content": ["must be a string, null or a list of parts"]})
    texts: list[str] = []
    images: list[str] = []
    errors: dict[int, Any] = {}
    for index, part in enumerate(content):
        try:
            _part(part, texts, images)
        except ValidationError as exc:
            errors[index] = exc.messages
    if errors:
        raise ValidationError({"content": errors})
    return "\n".join(texts), images


def _part(part: Any, texts: list[str], images: list[str]) -> None:
    if not isinstance(part, dict):
        raise ValidationError("must be a content part object with a 'type'")
    kind = part.get("type")
    if kind == "text" or kind == "refusal":
        text = part.get(kind)
        if not isinstance(text, str):
            raise ValidationError({kind: ["must be a string"]})
        texts.append(text)
    elif kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise ValidationError({"image_url": ["must be an object with a 'url' string"]})
        images.append(url)
    else:
        raise ValidationError({"type": [
            f"{kind!r} content parts are not supported; use 'text' or 'image_url'"]})


def _tool_calls(calls: Any) -> list[ToolCall]:
    if not isinstance(calls, list):
        raise ValidationError({"tool_calls": ["must be a list"]})
    result: list[ToolCall] = []
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValidationError({"tool_calls": {index: [
                "must be an object with function.name and function.arguments"]}})
        arguments = function.get("arguments", "")
        if not isinstance(arguments, str):
            raise ValidationError({"tool_calls": {index: [
                "function.arguments must be a JSON string"]}})
        result.append({"id": str(call.get("id", "")), "type": "function",
                       "function": {"name": function["name"], "arguments": arguments}})
    return result

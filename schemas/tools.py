"""Chat fields beyond FastChat's: tools, tool_choice, response_format, logprobs.

They are checked here, in OpenAI's shapes, for every model. An OpenAI-compatible upstream
gets them as the client sent them; a FastChat worker that does not list the capability
gets a 400 naming the parameter (``app.serving.chat``), never a silent drop.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping

from marshmallow import Schema, ValidationError, fields

from schemas.fields import Bool

_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOOL_CHOICES = ("none", "auto", "required")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")

# What a worker can enforce while generating without one request slowing the batch it
# shares with others: a grammar's literal (a const, an enum value, a pattern, a choice) is
# matched character by character at every step, about half a millisecond per KB.
MAX_TOOLS = 128
MAX_NESTING = 32
MAX_SCHEMA_BYTES = 64 * 1024
MAX_LITERAL = 1000
MAX_REGEX = 2000
MAX_CHOICES = 256
MAX_CHOICES_BYTES = 16 * 1024
# Keywords whose values are not enforced (any length is fine), and keywords whose values
# map names to schemas (where a key is a name, not a keyword).
ANNOTATIONS = frozenset({"description", "title", "examples", "default", "$comment"})
SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions",
                         "dependentSchemas"})


def schema_problem(schema: Any) -> str | None:
    """What makes a JSON schema too big to enforce while generating, or None."""
    size = 0
    stack: list[tuple[Any, int, bool, bool]] = [(schema, 1, False, False)]
    while stack:  # (value, depth, inside an annotation, a map of names to schemas)
        value, depth, annotation, names = stack.pop()
        if depth > MAX_NESTING:
            return f"nests deeper than {MAX_NESTING} levels"
        if isinstance(value, dict):
            for key, item in value.items():
                size += len(key)
                if not annotation and len(key) > MAX_LITERAL:
                    return f"has a name longer than {MAX_LITERAL} characters"
                skip = annotation or (not names and key in ANNOTATIONS)
                stack.append((item, depth + 1, skip, not names and key in SCHEMA_MAPS))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, annotation, False) for item in value)
        elif isinstance(value, str):
            size += len(value)
            if not annotation and len(value) > MAX_LITERAL:
                return f"has a string longer than {MAX_LITERAL} characters (a const, an " \
                    "enum value or a pattern is matched character by character)"
        if size > MAX_SCHEMA_BYTES:
            return f"is larger than {MAX_SCHEMA_BYTES // 1024} KiB"
    return None


def function_problem(value: Any) -> tuple[str, str] | None:
    """(the field, what is wrong with it) for a function definition, or None if it is
    fine. Shared with the Responses API's flat tools (``app.responses.translate``)."""
    if not isinstance(value, dict):
        return "", "must be an object"
    name = value.get("name")
    if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
        return "name", "must be 1-64 letters, digits, '_' or '-'"
    if "parameters" in value and not isinstance(value["parameters"], dict):
        return "parameters", "must be a JSON Schema object"
    problem = schema_problem(value.get("parameters"))
    if problem is not None:
        return "parameters", problem
    if "description" in value and not isinstance(value["description"], str):
        return "description", "must be a string"
    return None


def _function(value: Any, where: str) -> None:
    problem = function_problem(value)
    if problem is not None:
        field, what = problem
        raise ValidationError(f"{where}.{field} {what}" if field else f"{where} {what}")


class Tools(fields.Field[list[dict[str, Any]]]):
    """[{"type": "function", "function": {"name", "description"?, "parameters"?}}]"""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> list[dict[str, Any]]:
        if not isinstance(value, list):
            raise ValidationError("must be an array of tools")
        if len(value) > MAX_TOOLS:
            raise ValidationError(f"must hold at most {MAX_TOOLS} tools")
        for index, tool in enumerate(value):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise ValidationError(f"[{index}] must be {{\"type\": \"function\", "
                                      "\"function\": {...}}")
            _function(tool.get("function"), f"[{index}].function")
        return value


class Functions(fields.Field[list[dict[str, Any]]]):
    """The deprecated ``functions``: [{"name", "description"?, "parameters"?}]"""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> list[dict[str, Any]]:
        if not isinstance(value, list):
            raise ValidationError("must be an array of functions")
        for index, function in enumerate(value):
            _function(function, f"[{index}]")
        return value


class ToolChoice(fields.Field[Any]):
    """"none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}"""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> Any:
        if isinstance(value, str):
            if value not in TOOL_CHOICES:
                raise ValidationError(f"must be one of {', '.join(TOOL_CHOICES)} or a "
                                      "function choice")
            return value
        if isinstance(value, dict) and value.get("type") == "function":
            _function(value.get("function"), ".function")
            return value
        raise ValidationError("must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                              "\"function\": {\"name\": ...}}")


class ResponseFormat(fields.Field[dict[str, Any]]):
    """{"type": "text" | "json_object"} or {"type": "json_schema", "json_schema": {...}}"""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> dict[str, Any]:
        if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMATS:
            raise ValidationError(f"must be an object whose type is one of "
                                  f"{', '.join(RESPONSE_FORMATS)}")
        if value["type"] == "json_schema":
            spec = value.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise ValidationError("json_schema must be an object with a name (and a "
                                      "schema)")
            if "schema" in spec and not isinstance(spec["schema"], dict):
                raise ValidationError("json_schema.schema must be a JSON Schema object")
            problem = schema_problem(spec.get("schema"))
            if problem is not None:
                raise ValidationError(f"json_schema.schema {problem}")
        return value


class GuidedChoice(fields.Field[list[str]]):
    """vLLM's ``guided_choice``: the reply is exactly one of these strings."""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> list[str]:
        if not isinstance(value, list) or not value or len(value) > MAX_CHOICES or \
                not all(isinstance(choice, str) and choice for choice in value):
            raise ValidationError(f"must be a list of 1 to {MAX_CHOICES} non-empty strings")
        if max(map(len, value)) > MAX_LITERAL or sum(map(len, value)) > MAX_CHOICES_BYTES:
            raise ValidationError(f"choices must be at most {MAX_LITERAL} characters each and "
                                  f"{MAX_CHOICES_BYTES // 1024} KiB in all")
        return value


class GuidedRegex(fields.Field[str]):
    """vLLM's ``guided_regex``: the reply matches it whole."""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ValidationError("must be a non-empty string")
        if len(value) > MAX_REGEX:
            raise ValidationError(f"must be at most {MAX_REGEX} characters")
        return value


class GuidedJson(fields.Field[Any]):
    """vLLM's ``guided_json``: a JSON schema, as an object or a string holding one."""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> Any:
        if not isinstance(value, (dict, str)):
            raise ValidationError("must be a JSON schema object (or a string holding one)")
        schema = value
        if isinstance(value, str):
            try:
                schema = json.loads(value)
            except (ValueError, RecursionError):
                raise ValidationError("must be a JSON schema: the string is not JSON") \
                    from None
        if not isinstance(schema, dict):
            raise ValidationError("must be a JSON schema object")
        problem = schema_problem(schema)
        if problem is not None:
            raise ValidationError(problem)
        return value


class GuidedFields(Schema):
    """vLLM's guided decoding, which its users send through the openai client's
    extra_body: on chat and text completions, and in the worker protocol."""

    guided_json = GuidedJson(allow_none=True, load_default=None)
    guided_regex = GuidedRegex(allow_none=True, load_default=None)
    guided_choice = GuidedChoice(allow_none=True, load_default=None)


class StructuredFields(GuidedFields):
    """What shapes a chat reply: tools and response_format (and the guided fields)."""

    tools = Tools(allow_none=True, load_default=None)
    tool_choice = ToolChoice(allow_none=True, load_default=None)
    parallel_tool_calls = Bool(allow_none=True, load_default=None)
    response_format = ResponseFormat(allow_none=True, load_default=None)

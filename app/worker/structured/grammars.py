"""What a request asks its reply to look like, as one llguidance grammar: OpenAI's
``response_format`` and tool calls, vLLM's ``guided_json`` / ``guided_regex`` /
``guided_choice``. Pure text building; compiling is ``app.worker.structured.matchers``'.

A grammar comes with the request field it came from, so that a schema the engine cannot
enforce is a 400 naming that field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from llguidance import LLMatcher

from app.errors import InvalidRequest
from app.worker.structured.tool_calls import ToolFormat
from schemas.tools import ANNOTATIONS, SCHEMA_MAPS

if TYPE_CHECKING:  # only in llguidance's type stubs
    from llguidance._lib import JsonCompileOptions

ANY_OBJECT: dict[str, Any] = {"type": "object"}
MAX_CALLS = 16  # in one reply, when parallel calls are allowed
DATA = frozenset({"const", "enum"})  # keywords whose values are JSON data, not schemas
# JSON as models write it (and as a prompt's examples show it): one space after ":" and
# ",", no other whitespace. Free whitespace would let a model pad a reply up to its
# max_tokens without saying anything.
JSON_STYLE: "JsonCompileOptions" = {"whitespace_flexible": False, "item_separator": ", ",
                                    "key_separator": ": "}


@dataclass(frozen=True)
class Grammar:
    text: str  # llguidance's grammar (JSON holding a JSON schema, a regex or Lark)
    param: str  # the request field it enforces
    schema: dict[str, Any] | None = None  # when it is a JSON schema's


def reply_grammar(params: Any) -> Grammar | None:
    """The grammar for the reply's text (not tool calls), or None for free text."""
    asked = [name for name in ("response_format", "guided_json", "guided_regex",
                               "guided_choice") if params.get(name) is not None]
    if len(asked) > 1:
        raise InvalidRequest(f"Send one of {' and '.join(repr(a) for a in asked)}: a reply "
                             "can follow one format.", asked[1])
    if not asked:
        return None
    param = asked[0]
    value = params[param]
    if param == "guided_regex":
        return Grammar(LLMatcher.grammar_from_regex(value), param)
    if param == "guided_choice":
        return Grammar(LLMatcher.grammar_from_lark("start: " + " | ".join(
            _literal(choice) for choice in value)), param)
    schema = json_schema(value, param)
    if schema is None:
        return None  # response_format text
    schema = enforced(schema)
    return Grammar(LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE), param,
                   schema)


def json_schema(value: Any, param: str) -> dict[str, Any] | None:
    """The JSON schema a ``response_format`` or ``guided_json`` asks for."""
    if param == "guided_json":
        if isinstance(value, str):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise InvalidRequest("'guided_json' must be a JSON schema (an object, or a "
                                     "string holding one).", param) from None
        if not isinstance(value, dict):
            raise InvalidRequest("'guided_json' must be a JSON schema object.", param)
        return value
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    schema = value["json_schema"].get("schema")
    return schema if schema is not None else ANY_OBJECT


def tool_grammar(tools: list[dict[str, Any]], choice: Any, parallel: bool,
                 fmt: ToolFormat, reply: Grammar | None, free_text: bool) -> Grammar | None:
    """The grammar for a reply that holds tool calls: ``choice`` "required" (one call, or
    several when ``parallel``), a named function (one call of it), or "auto" when
    ``free_text`` is False (the model's template knows no tools: the reply is then the
    text, or one call) or ``reply`` asks for a format (the reply follows it, or is one
    call). None: the reply is free, and parsed for calls afterwards."""
    functions = [tool["function"] for tool in tools]
    if isinstance(choice, dict):
        wanted = choice["function"]["name"]
        functions = [f for f in functions if f["name"] == wanted]
        if not functions:
            raise InvalidRequest(f"tool_choice names the function {wanted!r}, which is not "
                                 "among the tools.", "tool_choice")
        parallel = False
    elif choice not in ("required", "auto", None):
        return None
    rules = [_call_rule(index, function, fmt) for index, function in enumerate(functions)]
    calls = "call: " + " | ".join(f"call_{i}" for i in range(len(functions)))
    if choice in ("auto", None):
        if reply is not None:  # the format asked for, or a call
            start = f"start: reply | call\nreply: {_embedded(_reply_schema(reply))}"
        elif free_text:
            return None
        else:
            first = (fmt.open or "{")[0]  # what only a call starts with
            start = f"start: (TEXT | call)?\nTEXT: /[^{first}][\\s\\S]*/"
    elif parallel and fmt.open:
        start = f"start: call ({_literal(chr(10))} call){{0,{MAX_CALLS - 1}}}"
    else:
        start = "start: call"
    return Grammar(LLMatcher.grammar_from_lark("\n".join([start, calls, *rules])), "tools")


def _call_rule(index: int, function: dict[str, Any], fmt: ToolFormat) -> str:
    """One function's call, its name and the words around its arguments fixed."""
    head = '{"name": ' + orjson.dumps(function["name"]).decode() + \
        f', "{fmt.arguments_key}": '
    tail = "}"
    if fmt.open:
        head, tail = f"{fmt.open}\n{head}", f"{tail}\n{fmt.close}"
    parameters = enforced(function.get("parameters") or ANY_OBJECT)
    return f"call_{index}: {_literal(head)} args_{index} {_literal(tail)}\n" \
        f"args_{index}: {_embedded(parameters)}"


def enforced(schema: Any, names: bool = False) -> Any:
    """The schema without its annotations (descriptions, titles, examples...): they do
    not change what may be written, and the grammar's text is its cache key. ``names``:
    ``schema`` maps names to schemas (properties...), whose keys are kept."""
    if isinstance(schema, list):
        return [enforced(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {key: value if not names and key in DATA else
            enforced(value, not names and key in SCHEMA_MAPS)
            for key, value in schema.items() if names or key not in ANNOTATIONS}


def _embedded(schema: dict[str, Any]) -> str:
    """A JSON schema inside a Lark grammar, in JSON_STYLE unless it says otherwise."""
    options = schema.get("x-guidance")
    styled = {**schema, "x-guidance": {**JSON_STYLE, **(options if isinstance(options, dict)
                                                        else {})}}
    return "%json " + orjson.dumps(styled).decode()


def _reply_schema(reply: Grammar) -> dict[str, Any]:
    if reply.schema is None:
        raise InvalidRequest(f"'{reply.param}' cannot be combined with tools the model may "
                             "call; use a JSON schema (response_format) or "
                             "tool_choice \"none\".", reply.param)
    return reply.schema


def _literal(text: str) -> str:
    """A Lark string literal (JSON's escapes, which llguidance's Lark reads)."""
    return orjson.dumps(text).decode()

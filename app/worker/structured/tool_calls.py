"""Tool calls in a model's reply: the formats models write them in, and the parser that
finds them in the reply's text as it grows.

Hermes format (Qwen 2.5 and 3, Hermes, SmolLM3, and every model whose chat template knows
no tools: flaskchat then describes the tools in a system message that asks for it)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call. Llama 3.1 format: the whole reply is one JSON object
``{"name": ..., "parameters": {...}}``.

The parser is fed the cumulative reply each time and gives back the content before the
first call and the calls so far, each call's ``arguments`` growing only by appending (the
gateway streams the difference), so a call shows up once its name is complete and its
arguments stream as they are written. It runs in the batch's loop, once per frame: the
character scan that finds where arguments end only reads what was appended since.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
import shortuuid


@dataclass(frozen=True)
class ToolFormat:
    name: str
    open: str  # what starts a call ("" : the reply itself is the call)
    close: str
    arguments_key: str

    def block(self, name: str, arguments: str) -> str:
        """A call written in this format (for the history a template cannot render)."""
        body = '{"name": ' + orjson.dumps(name).decode() + f', "{self.arguments_key}": ' \
            + arguments + "}"
        return f"{self.open}\n{body}\n{self.close}" if self.open else body


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>", "arguments")
LLAMA3 = ToolFormat("llama3", "", "", "parameters")

# The start of a call object, name first: what lets a call stream before it is complete.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.){1,64})"\s*,\s*'
                   r'"(?:arguments|parameters)"\s*:\s*')


def new_call_id() -> str:
    return "call_" + shortuuid.random(24)


class ToolCallParser:
    """``names``: the request's functions (a call to any other is text, not a call);
    ``parallel``: more than one call; ``leading_only``: a call only at the reply's start
    (a grammar shaped the reply: text it let through freely holds no unchecked call)."""

    def __init__(self, fmt: ToolFormat, names: frozenset[str] | None = None,
                 parallel: bool = True, leading_only: bool = False) -> None:
        self.format = fmt
        self._names = names
        self._parallel = parallel
        self._leading_only = leading_only
        self._content: str | None = None  # the text before the first call, once found
        self._done: list[dict[str, Any]] = []  # complete calls: never parsed again
        self._resume = 0  # where the text after the last complete call starts
        self._arguments_end = ValueEnd()  # the call in progress's
        self._ids: list[str] = []  # one per call found, stable from frame to frame

    def parse(self, text: str, final: bool) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, calls) of the reply so far. ``content`` is None when the reply is
        only calls. When ``final``, a reply whose calls do not parse is all content."""
        if self.format.open:
            calls = self._blocks(text, final)
        else:
            calls = self._whole(text, final)
        if calls is None or (final and not calls):
            return self._text_only(text, final), []
        content = self._content or ""
        return (content if content.strip() or not calls else None), calls

    def _text_only(self, text: str, final: bool) -> str:
        """The content of a reply with no call so far: all of it, but (while it grows)
        what might be the start of a call."""
        if final or self._content is not None:
            return text
        if self._leading_only or not self.format.open:
            return "" if self.format.open.startswith(text.lstrip()) and \
                self.format.open else text
        return text[:len(text) - _held(text, self.format.open)]

    def _blocks(self, text: str, final: bool) -> list[dict[str, Any]] | None:
        opening, closing = self.format.open, self.format.close
        if self._content is None:
            start = text.find(opening)
            if start < 0 or (self._leading_only and text[:start].strip()):
                return None
            self._content, self._resume = text[:start], start
        calls = list(self._done)
        start = text.find(opening, self._resume)
        while start >= 0 and (self._parallel or not self._done):
            begin = start + len(opening)
            end = text.find(closing, begin)
            if end < 0:  # in progress: the first shows as it grows, a later one once
                if not self._done:  # complete (it may yet be a repeat, then dropped)
                    found = self._found(text[begin:], False)
                    if found is not None:
                        calls.append(found)
                return calls
            found = self._found(text[begin:end], True)
            if found is None:
                return None if final else calls  # not a call: the reply is text
            self._done.append(found)
            calls.append(found)
            self._arguments_end = ValueEnd()
            self._resume = end + len(closing)
            start = text.find(opening, self._resume)
        return calls

    def _whole(self, text: str, final: bool) -> list[dict[str, Any]] | None:
        stripped = text.lstrip()
        if stripped.startswith("<|python_tag|>"):
            stripped = stripped[len("<|python_tag|>"):].lstrip()
        if not stripped.startswith("{"):
            return None
        self._content = ""
        found = self._found(stripped, final)
        if found is None:
            return None if final else []
        return [found]

    def _found(self, body: str, complete: bool) -> dict[str, Any] | None:
        found = _call(body, complete, self._arguments_end)
        if found is None or (self._names is not None and found[0] not in self._names):
            return None
        index = len(self._done)
        if index == len(self._ids):
            self._ids.append(new_call_id())
        return {"id": self._ids[index], "type": "function",
                "function": {"name": found[0], "arguments": found[1]}}

    def repeated_call(self, text: str) -> int | None:
        """Where the call that ``text`` just closed starts, if it repeats an earlier call
        of the reply word for word (small models, allowed several calls, repeat the
        first until max_tokens): the reply then ends before it."""
        opening, closing = self.format.open, self.format.close
        if not closing or not text.endswith(closing):
            return None
        start = text.rfind(opening)
        if start <= 0:
            return None
        last = _loads(text[start + len(opening):len(text) - len(closing)])
        if last is None:
            return None
        earlier = text.find(opening)
        while 0 <= earlier < start:
            end = text.find(closing, earlier)
            if _loads(text[earlier + len(opening):end]) == last:
                return start
            earlier = text.find(opening, end + len(closing))
        return None


def _call(body: str, complete: bool, ends: "ValueEnd") -> tuple[str, str] | None:
    """(name, arguments so far) of one call's text, or None while (or if) it is not one.
    ``ends`` scans this call's arguments (the same call's text, longer each time)."""
    head = _HEAD.match(body)
    if head is not None:
        try:
            name = orjson.loads('"' + head.group(1) + '"')
        except orjson.JSONDecodeError:
            return None
        rest = body[head.end():]  # starts where the arguments do, once they have started
        if not rest:
            return None if complete else (name, "")
        if rest.startswith('"') and not complete:
            return name, ""  # arguments written as a string: given whole once complete
        end = ends.scan(rest)
        if end is not None:
            written = rest[:end]
            if written.startswith('"'):
                decoded = _loads(written)
                return (name, decoded) if isinstance(decoded, str) else None
            return (name, written) if _loads(written) is not None else None
        return None if complete else (name, rest)
    if not complete:
        return None
    parsed = _loads(body)
    if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
        return None
    arguments = parsed.get("arguments", parsed.get("parameters", {}))
    if isinstance(arguments, str):
        return parsed["name"], arguments
    try:
        return parsed["name"], orjson.dumps(arguments).decode()
    except (TypeError, orjson.JSONEncodeError):  # nested deeper than orjson writes
        return None


class ValueEnd:
    """Where the JSON object, array or string a text starts with ends (the index after
    it), for a text that only grows: each scan reads only what was appended."""

    def __init__(self) -> None:
        self._scanned = 0
        self._depth = 0
        self._in_string = self._escaped = False
        self._end: int | None = None

    def scan(self, text: str) -> int | None:
        if self._end is not None:
            return self._end
        for position in range(self._scanned, len(text)):
            char = text[position]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
                    if self._depth == 0:
                        self._end = position + 1
                        return self._end
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    self._end = position + 1
                    return self._end
        self._scanned = len(text)
        return None


def value_end(text: str) -> int | None:
    return ValueEnd().scan(text)


def _loads(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def _held(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0

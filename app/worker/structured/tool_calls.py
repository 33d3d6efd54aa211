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
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"'
                   r'\s*:\s*')


def new_call_id() -> str:
    return "call_" + shortuuid.random(24)


class ToolCallParser:
    def __init__(self, fmt: ToolFormat) -> None:
        self.format = fmt
        self._ids: list[str] = []  # one per call found so far, stable across feeds
        self._ends: list[ValueEnd] = []  # where each call's arguments end, scanned so far

    def parse(self, text: str, final: bool) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, calls) of the reply so far. ``content`` is None when the reply is
        only calls. When ``final``, a reply whose calls do not parse is all content."""
        if self.format.open:
            content, bodies = self._hermes(text, final)
        else:
            content, bodies = self._whole(text, final)
        calls = []
        for index, (body, complete) in enumerate(bodies):
            if index and not complete:
                break  # a later call shows once complete: it may yet be a repeat (dropped)
            if len(self._ends) <= index:
                self._ends.append(ValueEnd())
            found = _call(body, complete, self._ends[index])
            if found is None:
                if final and complete:
                    return text, []  # not a call after all: the text is the answer
                break
            calls.append(self._tool_call(index, *found))
        if final and not calls:
            return text, []
        return (content if content.strip() or not calls else None), calls

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
        _, bodies = self._hermes(text[:start], final=True)
        return start if any(_loads(body) == last for body, _ in bodies) else None

    def _hermes(self, text: str, final: bool) -> tuple[str, list[tuple[str, bool]]]:
        opening, closing = self.format.open, self.format.close
        start = text.find(opening)
        if start < 0:
            held = 0 if final else _held(text, opening)
            return text[:len(text) - held], []
        bodies = []
        while start >= 0:
            begin = start + len(opening)
            end = text.find(closing, begin)
            if end < 0:
                bodies.append((text[begin:], False))
                break
            bodies.append((text[begin:end], True))
            start = text.find(opening, end + len(closing))
        return text[:text.find(opening)], bodies

    @staticmethod
    def _whole(text: str, final: bool) -> tuple[str, list[tuple[str, bool]]]:
        stripped = text.lstrip()
        if stripped.startswith("<|python_tag|>"):
            stripped = stripped[len("<|python_tag|>"):].lstrip()
        if not stripped:
            return ("" if not final else text), []
        if not stripped.startswith("{"):
            return text, []
        return "", [(stripped, final)]

    def _tool_call(self, index: int, name: str, arguments: str) -> dict[str, Any]:
        while len(self._ids) <= index:
            self._ids.append(new_call_id())
        return {"id": self._ids[index], "type": "function",
                "function": {"name": name, "arguments": arguments}}


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
    return parsed["name"], orjson.dumps(arguments).decode()


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

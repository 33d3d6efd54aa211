"""Tool calls found in a reply as it grows (flaskchat's worker), and the OpenAI deltas the
gateway streams from them: pure logic, no model, no sockets."""
from __future__ import annotations

from typing import Any

import orjson
import pytest

from app.serving.stream_driver import _call_deltas
from app.worker.structured.tool_calls import (HERMES, LLAMA3, ToolCallParser, ValueEnd,
                                              value_end)

HERMES_REPLY = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": '
                '{"city": "Paris", "days": [1, 2]}}\n</tool_call>\n<tool_call>\n'
                '{"name": "add", "arguments": {"a": 1, "b": "}{\\""}}\n</tool_call>')


def feed_by_character(parser: ToolCallParser, reply: str) -> list[tuple[Any, Any]]:
    return [parser.parse(reply[:end], final=end == len(reply))
            for end in range(1, len(reply) + 1)]


def test_hermes_calls_grow_by_appending_and_parse_in_the_end() -> None:
    parser = ToolCallParser(HERMES)
    steps = feed_by_character(parser, HERMES_REPLY)
    content, calls = steps[-1]
    assert content == "Let me look.\n"
    assert [call["function"]["name"] for call in calls] == ["get_weather", "add"]
    assert orjson.loads(calls[0]["function"]["arguments"]) == {"city": "Paris",
                                                               "days": [1, 2]}
    assert orjson.loads(calls[1]["function"]["arguments"]) == {"a": 1, "b": '}{"'}
    assert all(call["id"].startswith("call_") and call["type"] == "function"
               for call in calls)
    # Never a character of the marker in the content, and every step's arguments are a
    # prefix of the next step's (what lets the gateway stream the difference).
    previous: dict[int, str] = {}
    for step_content, step_calls in steps:
        assert "<" not in (step_content or "")
        for index, call in enumerate(step_calls):
            assert call["id"] == calls[index]["id"]
            assert call["function"]["arguments"].startswith(previous.get(index, ""))
            previous[index] = call["function"]["arguments"]


def test_a_reply_without_calls_or_with_a_broken_one_is_all_content() -> None:
    assert ToolCallParser(HERMES).parse("Just text <tool", final=False) == ("Just text ", [])
    assert ToolCallParser(HERMES).parse("Just text <tool", final=True) == \
        ("Just text <tool", [])
    broken = "<tool_call>\nnot json\n</tool_call>"
    assert ToolCallParser(HERMES).parse(broken, final=True) == (broken, [])


def test_a_call_whose_name_comes_last_is_given_whole_once_complete() -> None:
    reply = '<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>'
    parser = ToolCallParser(HERMES)
    assert parser.parse(reply[:-12], final=False)[1] == []  # not yet a call
    content, calls = parser.parse(reply, final=True)
    assert content is None and calls[0]["function"] == {"name": "f", "arguments": '{"x":1}'}


def test_llama3_replies_are_one_json_call() -> None:
    reply = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    content, calls = feed_by_character(ToolCallParser(LLAMA3), reply)[-1]
    assert content is None
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert ToolCallParser(LLAMA3).parse("Paris is sunny.", final=True) == \
        ("Paris is sunny.", [])
    assert ToolCallParser(LLAMA3).parse('{"answer": 42}', final=True) == ('{"answer": 42}', [])


@pytest.mark.parametrize("text,end", [('{"a": "}"} tail', 10), ('[1, [2]], 3', 8),
                                      ('"a\\"b" x', 6), ('{"a": {', None), ("", None)])
def test_value_end(text: str, end: int | None) -> None:
    assert value_end(text) == end


def test_the_gateway_streams_new_calls_then_argument_pieces() -> None:
    sent: list[int] = []
    first = {"tool_calls": [{"id": "call_1", "type": "function",
                             "function": {"name": "f", "arguments": '{"a"'}}]}
    assert _call_deltas(first, sent) == [{"index": 0, "id": "call_1", "type": "function",
                                          "function": {"name": "f", "arguments": '{"a"'}}]
    grown = {"tool_calls": [{"id": "call_1", "type": "function",
                             "function": {"name": "f", "arguments": '{"a": 1}'}},
                            {"id": "call_2", "type": "function",
                             "function": {"name": "g", "arguments": ""}}]}
    assert _call_deltas(grown, sent) == [
        {"index": 0, "function": {"arguments": ": 1}"}},
        {"index": 1, "id": "call_2", "type": "function",
         "function": {"name": "g", "arguments": ""}}]
    assert _call_deltas(grown, sent) == []  # nothing new
    assert _call_deltas({"tool_calls": [{"function": None}]}, []) == []  # a bad frame
    assert _call_deltas({"tool_calls": "nonsense"}, []) == []
    assert _call_deltas({"tool_calls": [{"id": 3, "function": {"name": "f",
                                                               "arguments": ""}}]}, []) == []


def test_the_end_of_a_growing_value_is_found_reading_each_character_once() -> None:
    text = '{"a": "x\\"}", "b": [1, {"c": "]"}]} and after'
    scanner = ValueEnd()
    found = [scanner.scan(text[:size]) for size in range(len(text) + 1)]
    end = value_end(text)
    assert end == text.index(" and")
    assert found[:end] == [None] * end and set(found[end:]) == {end}


def test_a_call_that_repeats_an_earlier_one_ends_the_reply_before_it() -> None:
    parser = ToolCallParser(HERMES)
    first = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    other = '\n<tool_call>\n{"name": "f", "arguments": {"a": 2}}\n</tool_call>'
    again = '\n<tool_call>\n{"name": "f", "arguments": {"a":1}}\n</tool_call>'
    assert parser.repeated_call(first) is None
    assert parser.repeated_call(first + other) is None
    assert parser.repeated_call(first + other + again) == len(first + other) + 1
    assert parser.repeated_call(first + other + again[:-3]) is None  # not closed yet
    # A later call is not shown until complete (it might be a repeat, then dropped).
    assert len(parser.parse(first + other[:-5], final=False)[1]) == 1
    assert len(parser.parse(first + other, final=False)[1]) == 2


def test_what_the_model_writes_never_breaks_the_parser() -> None:
    """Nesting deeper than orjson writes, a name that never ends, a function nobody
    declared: the reply is text, and nothing raises."""
    deep = '<tool_call>\n{"arguments": ' + "[" * 300 + "]" * 300 + ', "name": "f"}\n</tool_call>'
    assert ToolCallParser(HERMES, frozenset({"f"})).parse(deep, final=True) == (deep, [])
    endless = '<tool_call>\n{"name": "' + "n" * 10_000
    assert ToolCallParser(HERMES).parse(endless, final=False) == ("", [])
    stranger = '<tool_call>\n{"name": "rm", "arguments": {}}\n</tool_call>'
    assert ToolCallParser(HERMES, frozenset({"f"})).parse(stranger, final=True) == \
        (stranger, [])


def test_after_a_grammar_only_a_leading_call_counts() -> None:
    """With "text, or one call" the text branch is free: a call inside it was never
    checked against the tool's parameters, so it stays text."""
    reply = 'Sure. <tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert ToolCallParser(HERMES, frozenset({"f"}), leading_only=True).parse(
        reply, final=True) == (reply, [])
    one = ToolCallParser(HERMES, frozenset({"f"}), parallel=False)
    _, calls = one.parse(reply + "\n" + reply[6:], final=True)
    assert len(calls) == 1

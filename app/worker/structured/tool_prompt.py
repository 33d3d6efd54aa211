"""Tools and tool-call history in the prompt.

A chat template that knows tools (it uses a ``tools`` variable: Qwen 2.5/3, Hermes, Llama
3.1...) renders them itself: transformers' ``apply_chat_template(tools=...)``, with the
history's calls and results as the template expects them. For any other template the tools
are described in a system message asking for Hermes-style ``<tool_call>`` blocks, earlier
calls are written back in that form and results come as user turns in
``<tool_response>`` blocks, so the model sees its own format.
"""
from __future__ import annotations

from typing import Any

import orjson

from app.worker.structured.tool_calls import HERMES, LLAMA3, ToolFormat

INSTRUCTIONS = (
    "You can call functions to answer the user. They are described by these JSON "
    "schemas:\n<tools>\n{tools}\n</tools>\nTo call a function, reply with only:\n"
    "<tool_call>\n{{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}}\n"
    "</tool_call>\nOtherwise, answer the user directly.")


def template_tools(chat_template: str | None) -> tuple[ToolFormat, bool]:
    """The format the model writes calls in, and whether its template renders tools."""
    if not chat_template or "tools" not in chat_template:
        return HERMES, False
    if "<tool_call>" in chat_template:
        return HERMES, True
    return LLAMA3, True


def template_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                      renders_tools: bool) -> list[dict[str, Any]]:
    """The request's messages as the chat template should see them."""
    if renders_tools:
        return [_native(message) for message in messages]
    plain = [_written(message) for message in messages]
    if tools:
        described = "\n".join(orjson.dumps(tool).decode() for tool in tools)
        system = INSTRUCTIONS.format(tools=described)
        if plain and plain[0]["role"] == "system":
            plain[0] = {"role": "system", "content": plain[0]["content"] + "\n\n" + system}
        else:
            plain.insert(0, {"role": "system", "content": system})
    return plain


def template_tools_of(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tools as templates expect them: every function with ``parameters`` (some
    templates iterate over them)."""
    return [{"type": "function",
             "function": {**tool["function"],
                          "parameters": tool["function"].get("parameters") or
                          {"type": "object", "properties": {}}}}
            for tool in tools]


def _native(message: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message["role"], "content": message.get("content") or ""}
    if message.get("tool_calls"):
        out["tool_calls"] = [{"id": call.get("id"), "type": "function",
                              "function": {"name": call["function"]["name"],
                                           "arguments": _arguments(call)}}
                             for call in message["tool_calls"]]
    if message.get("tool_call_id"):
        out["tool_call_id"] = message["tool_call_id"]
    return out


def _written(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content") or ""
    if message["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    if message.get("tool_calls"):
        blocks = [HERMES.block(call["function"]["name"], _written_arguments(call))
                  for call in message["tool_calls"]]
        content = "\n".join([content, *blocks] if content else blocks)
    return {"role": message["role"], "content": content}


def _written_arguments(call: dict[str, Any]) -> str:
    """A call's arguments as the client sent them (a JSON string), never re-encoded."""
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str):
        return arguments
    try:
        return orjson.dumps(arguments).decode()
    except (TypeError, orjson.JSONEncodeError):
        return "{}"


def _arguments(call: dict[str, Any]) -> Any:
    """A call's arguments as an object (what templates serialize), when they parse."""
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str):
        try:
            return orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return arguments
    return arguments

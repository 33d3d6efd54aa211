"""A Responses request as a chat completions request (one code path for failover, limits,
usage, metrics and cancellation), and what of it cannot be served: a 400 naming the field,
never a field silently dropped."""
from __future__ import annotations

from typing import Any

import orjson

from app.errors import APIError, InvalidRequest
from app.serving.ids import new_id
from schemas import ChatMessage, ChatRequest, ResponsesRequest
from schemas.tools import function_problem

# Fields the Responses API has that the chat path cannot honour for any model here.
BUILT_IN_TOOLS = ("web_search", "web_search_preview", "file_search", "computer_use_preview",
                  "code_interpreter", "image_generation", "mcp", "local_shell", "custom")


def refuse_unsupported(body: ResponsesRequest) -> None:
    if body["background"]:
        raise InvalidRequest("Background responses are not supported: send the request "
                             "without 'background' (stream it to see progress).", "background")
    reasoning = body["reasoning"]
    if reasoning and any(value is not None for value in reasoning.values()):
        raise InvalidRequest(f"The model '{body['model']}' does not support reasoning "
                             "options.", "reasoning")
    if body["include"]:
        raise InvalidRequest(f"'include' is not supported: {body['include'][0]!r} cannot be "
                             "returned by this server.", "include")
    if body["truncation"] not in (None, "disabled"):
        raise InvalidRequest("Only 'truncation': 'disabled' is supported: a conversation "
                             "longer than the model's context is an error, not cut.",
                             "truncation")
    if body["conversation"] is not None:
        raise InvalidRequest("Conversations are not supported: continue a conversation "
                             "with 'previous_response_id'.", "conversation")
    if body["prompt"] is not None:
        raise InvalidRequest("Stored prompt templates are not supported: send the "
                             "'instructions' and 'input' themselves.", "prompt")
    if body["top_logprobs"]:
        raise InvalidRequest("'top_logprobs' is not supported on /v1/responses; chat "
                             "completions return logprobs where the model gives them.",
                             "top_logprobs")


def chat_request(body: ResponsesRequest, history: list[dict[str, Any]], max_messages: int
                 ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(the chat request as an OpenAI-compatible upstream gets it, this request's input
    items as stored and listed, the chat messages a follow-up replays: ``history`` plus
    this input). Everything in it is checked here or by the Responses schema, as the chat
    schema would check it (see ``chat_body``)."""
    items = normalized_items(body["input"])
    messages = [*history, *messages_of(items)]
    chat: dict[str, Any] = {"model": body["model"], "stream": bool(body["stream"])}
    instructions = body["instructions"]
    # Instructions are not carried into a follow-up: each request gives its own.
    chat["messages"] = ([{"role": "system", "content": instructions}] if instructions
                        else []) + messages
    if len(chat["messages"]) > max_messages:
        raise InvalidRequest(f"{len(chat['messages'])} messages (this input, the earlier "
                             "turns and the instructions) is more than the maximum of "
                             f"{max_messages}.", "input")
    if body["max_output_tokens"] is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "user", "parallel_tool_calls", "service_tier"):
        if body[name] is not None:
            chat[name] = body[name]
    if body["tools"]:
        chat["tools"] = [chat_tool(tool, index) for index, tool in enumerate(body["tools"])]
    if body["tool_choice"] is not None:
        chat["tool_choice"] = chat_tool_choice(body["tool_choice"])
    response_format = chat_response_format(body["text"])
    if response_format is not None:
        chat["response_format"] = response_format
    if chat["stream"]:
        chat["stream_options"] = {"include_usage": True}
    return chat, items, messages


def normalized_items(raw: str | list[Any]) -> list[dict[str, Any]]:
    """The input as items in OpenAI's stored form (each with an id)."""
    if isinstance(raw, str):
        return [{"type": "message", "id": new_id("msg_"), "role": "user",
                 "content": [{"type": "input_text", "text": raw}]}]
    items = []
    for index, item in enumerate(raw):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"Invalid '{where}': an input item must be an object.", where)
        kind = item.get("type", "message")
        if kind == "message":
            items.append(_message_item(item, where))
        elif kind == "function_call":
            items.append({"type": "function_call", "id": item.get("id") or new_id("fc_"),
                          "call_id": _text(item, "call_id", where),
                          "name": _text(item, "name", where),
                          "arguments": _text(item, "arguments", where),
                          "status": "completed"})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                output = orjson.dumps(output).decode() if output is not None else None
            if output is None:
                raise InvalidRequest(f"Missing '{where}.output'.", f"{where}.output")
            items.append({"type": "function_call_output",
                          "id": item.get("id") or new_id("fco_"),
                          "call_id": _text(item, "call_id", where), "output": output,
                          "status": "completed"})
        else:
            raise InvalidRequest(f"Invalid '{where}.type': {kind!r} input items are not "
                                 "supported; use message, function_call or "
                                 "function_call_output.", f"{where}.type")
    return items


def _text(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str) or (name != "arguments" and not value):
        raise InvalidRequest(f"Invalid '{where}.{name}': expected a non-empty string.",
                             f"{where}.{name}")
    return value


def _message_item(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise InvalidRequest(f"Invalid '{where}.role': expected user, system, developer or "
                             "assistant.", f"{where}.role")
    content = item.get("content")
    kind = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        parts = [{"type": kind, "text": content}]
    elif isinstance(content, list) and content:
        parts = []
        for index, part in enumerate(content):
            at = f"{where}.content[{index}]"
            if not isinstance(part, dict) or part.get("type") not in (
                    "input_text", "output_text", "text"):
                shown = part.get("type") if isinstance(part, dict) else part
                raise InvalidRequest(f"Invalid '{at}.type': {shown!r} content is not "
                                     "supported; use input_text (or output_text for the "
                                     "assistant).", f"{at}.type")
            if not isinstance(part.get("text"), str):
                raise InvalidRequest(f"Invalid '{at}.text': expected a string.", f"{at}.text")
            parts.append({"type": kind, "text": part["text"]})
    else:
        raise InvalidRequest(f"Invalid '{where}.content': expected a string or a non-empty "
                             "list of content parts.", f"{where}.content")
    return {"type": "message", "id": item.get("id") or new_id("msg_"), "role": role,
            "content": parts}


def messages_of(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as chat messages; function calls in a row become one assistant message
    with several tool calls."""
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item["type"]
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role,
                             "content": "".join(part["text"] for part in item["content"])})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") \
                    and not last.get("content"):
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": item["output"]})
    return messages


def chat_tool(tool: Any, index: int) -> dict[str, Any]:
    """The flat Responses form ``{type, name, description, parameters, strict}`` as chat's
    nested ``{type, function: {...}}``."""
    where = f"tools[{index}]"
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind != "function":
        what = "built-in tools such as" if kind in BUILT_IN_TOOLS else "tools of type"
        raise InvalidRequest(f"Invalid '{where}.type': {what} {kind!r} are not supported; "
                             "only function tools are.", f"{where}.type")
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"Missing '{where}.name'.", f"{where}.name")
    function: dict[str, Any] = {"name": name}
    for field in ("description", "parameters", "strict"):
        if tool.get(field) is not None:
            function[field] = tool[field]
    _check_function(function, where)
    return {"type": "function", "function": function}


def _check_function(function: dict[str, Any], where: str) -> None:
    """The chat schema's rules for a function (name, parameters, description)."""
    problem = function_problem(function)
    if problem is not None:
        field, what = problem
        raise InvalidRequest(f"Invalid '{where}.{field}': {what}.", f"{where}.{field}")


def chat_tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("name"), str):
        function = {"name": choice["name"]}
        _check_function(function, "tool_choice")
        return {"type": "function", "function": function}
    raise InvalidRequest("Invalid 'tool_choice': expected auto, none, required or "
                         "{\"type\": \"function\", \"name\": ...}.", "tool_choice")


def chat_response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    if not text or text.get("format") is None:
        return None
    fmt = text["format"]
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict) or not isinstance(fmt.get("name"), str):
            raise InvalidRequest("Invalid 'text.format': json_schema needs 'name' and "
                                 "'schema'.", "text.format")
        schema = {key: fmt[key] for key in ("name", "schema", "strict", "description")
                  if fmt.get(key) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidRequest("Invalid 'text.format.type': expected text, json_object or "
                         "json_schema.", "text.format.type")


# Chat fields an error from the chat path may name, as the Responses fields they came from.
RENAMED_PARAMS = {"max_tokens": "max_output_tokens", "response_format": "text.format",
                  "messages": "input"}


def with_responses_param(error: APIError) -> APIError:
    """An error raised on the chat path (a feature the worker lacks, a prompt too long for
    the context) names the field the client sent, not its chat name."""
    error.param = RENAMED_PARAMS.get(error.param or "", error.param)
    return error


def chat_body(chat: dict[str, Any]) -> ChatRequest:
    """``chat_request``'s request as the chat schema loads it, made directly: every field
    in it was checked on the way in, and loading it again cost a Responses request ~70 us
    in the gateway (7% of it). tests/test_responses.py holds this equal to the
    chat schema's load for every kind of request."""
    stream = chat["stream"]
    return {"model": chat["model"], "messages": [_chat_message(m) for m in chat["messages"]],
            "max_tokens": chat.get("max_tokens"), "n": 1,
            "temperature": chat.get("temperature"), "top_p": chat.get("top_p"),
            "top_k": None, "stop": [], "stream": stream, "include_usage": stream,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": None,
            "seed": None, "tools": chat.get("tools"), "functions": None,
            "tool_choice": chat.get("tool_choice"),
            "parallel_tool_calls": chat.get("parallel_tool_calls"),
            "guided_json": None, "guided_regex": None, "guided_choice": None,
            "response_format": chat.get("response_format"), "logprobs": False,
            "top_logprobs": None, "best_of": None, "service_tier": chat.get("service_tier")}


def _chat_message(message: dict[str, Any]) -> ChatMessage:
    """A message of ``messages_of`` (or of a stored context) in the chat schema's shape:
    content always a string."""
    if message.get("content") is None:
        return {**message, "content": ""}  # type: ignore[typeddict-item]
    return message  # type: ignore[return-value]

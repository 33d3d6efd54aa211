"""Response objects: the request's settings echoed as OpenAI returns them, the output
items made from a chat answer, and the usage in the Responses API's names."""
from __future__ import annotations

import time
from typing import Any

from app.serving.ids import new_id
from schemas import ResponsesRequest


def skeleton(body: ResponsesRequest, response_id: str, status: str) -> dict[str, Any]:
    """The response before any output: what ``response.created`` carries."""
    text = body["text"] or {}
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()),
        "status": status, "background": False, "error": None, "incomplete_details": None,
        "instructions": body["instructions"], "max_output_tokens": body["max_output_tokens"],
        "model": body["model"], "output": [],
        "parallel_tool_calls": body["parallel_tool_calls"]
        if body["parallel_tool_calls"] is not None else True,
        "previous_response_id": body["previous_response_id"],
        "reasoning": {"effort": None, "summary": None},
        "store": body["store"] is not False,
        "temperature": body["temperature"] if body["temperature"] is not None else 1.0,
        "text": {"format": text.get("format") or {"type": "text"}},
        "tool_choice": body["tool_choice"] if body["tool_choice"] is not None else "auto",
        "tools": [{"type": "function", "name": tool["name"],
                   "description": tool.get("description"),
                   "parameters": tool.get("parameters"), "strict": tool.get("strict", True)}
                  for tool in body["tools"] or []],
        "top_p": body["top_p"] if body["top_p"] is not None else 1.0,
        "truncation": "disabled", "usage": None, "user": body["user"],
        "safety_identifier": body["safety_identifier"],
        "prompt_cache_key": body["prompt_cache_key"],
        "metadata": body["metadata"] or {},
    }


def usage_of(chat_usage: dict[str, Any] | None) -> dict[str, Any]:
    chat_usage = chat_usage or {}
    prompt = int(chat_usage.get("prompt_tokens") or 0)
    completion = int(chat_usage.get("completion_tokens") or 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def message_item(text: str, status: str = "completed",
                 item_id: str | None = None) -> dict[str, Any]:
    return {"type": "message", "id": item_id or new_id("msg_"), "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def function_call_item(call_id: str, name: str, arguments: str, status: str = "completed",
                       item_id: str | None = None) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id or new_id("fc_"), "call_id": call_id,
            "name": name, "arguments": arguments, "status": status}


def finish(response: dict[str, Any], output: list[dict[str, Any]], finish_reason: str | None,
           chat_usage: dict[str, Any] | None) -> dict[str, Any]:
    response["output"] = output
    response["usage"] = usage_of(chat_usage)
    if finish_reason == "length":
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": "max_output_tokens"}
    else:
        response["status"] = "completed"
    return response


def from_chat(body: ResponsesRequest, response_id: str,
              completion: dict[str, Any]) -> dict[str, Any]:
    """A non-stream chat completion as a response object."""
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    if message.get("content"):
        output.append(message_item(message["content"]))
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        output.append(function_call_item(call.get("id") or new_id("call_"),
                                         function.get("name", ""),
                                         function.get("arguments") or ""))
    if not output:
        output.append(message_item(""))
    return finish(skeleton(body, response_id, "in_progress"), output,
                  choice.get("finish_reason"), completion.get("usage"))


def context_of(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The response's output as the chat messages a follow-up replays."""
    messages: list[dict[str, Any]] = []
    text = "".join(part["text"] for item in output if item["type"] == "message"
                   for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]
    if text or calls:
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            message["tool_calls"] = calls
        messages.append(message)
    return messages

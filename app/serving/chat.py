"""Chat completions: request -> prompt and worker params -> completion dict or SSE bytes."""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import orjson

from app.errors import InvalidRequest, UpstreamError
from app.protocol.capabilities import (FUNCTIONS, GUIDED, LOGPROBS, RENDERS_MESSAGES,
                                       RESPONSE_FORMAT, TOOLS)
from app.protocol.stop_strings import TextTracker, final_text
from app.serving.call import Call
from app.serving.events import DONE
from app.serving.ids import new_id
from app.serving.prompt import TemplateError, render, stop_strings
from app.serving.stream_driver import ChunkFormat, drive, tool_calls_of
from app.serving.token_budget import token_budget
from app.serving.usage import UsageTally
from app.serving.worker_calls import (generate_all, on_worker, open_streams,
                                      sampling_params, text_model_details)
from app.serving.worker_streams import WorkerStreams
from app.upstream.clients import Upstream
from app.upstream.failover import releaser
from schemas import ChatMessage, ChatRequest
from schemas.sampling import generations


@dataclass
class ChatPlan:
    params: dict[str, Any]
    stops: list[str]  # enforced by the gateway too
    prompt_tokens: int | None


def complete(body: ChatRequest, upstream: Upstream, call: Call) -> dict[str, Any]:
    _admit(body, upstream, call)

    def attempt(address: str) -> tuple[ChatPlan, list[dict[str, Any]]]:
        plan = _plan(body, upstream, call, address)
        return plan, generate_all(upstream, call, address, [plan.params], body["n"])

    address, (plan, frames) = on_worker(upstream, body["model"], attempt, call)
    upstream.controller.release(address)
    usage = UsageTally(body["n"], [plan.prompt_tokens])
    choices = []
    for index, frame in enumerate(frames):
        usage.record(index, frame)
        choices.append(_choice(index, frame, plan.stops))
    totals = usage.total()
    call.meter.report(totals["prompt_tokens"], totals["completion_tokens"])
    call.release_slot(totals["total_tokens"])  # the worker is done: its slot goes on now
    return {"id": new_id("chatcmpl-"), "object": "chat.completion",
            "created": int(time.time()), "model": body["model"], "choices": choices,
            "usage": totals, "service_tier": call.service_tier}


def _choice(index: int, frame: dict[str, Any], stops: list[str]) -> dict[str, Any]:
    text, reason = final_text(frame, stops)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    calls = tool_calls_of(frame)
    if calls:  # flaskchat's worker found tool calls in the reply
        message = {"role": "assistant", "content": text or None, "tool_calls": calls}
    return {"index": index, "message": message, "logprobs": None, "finish_reason": reason}


def open_stream(body: ChatRequest, upstream: Upstream, call: Call,
                fmt: ChunkFormat | None = None
                ) -> tuple[Iterator[bytes | None], list[Callable[[], object]]]:
    """Everything that can fail with a status happens here, before the first byte; the
    returned events and close callbacks go to ``sse.response``. ``fmt``: how the events
    are written (default: chat.completion.chunk events)."""
    _admit(body, upstream, call)
    n = body["n"]
    address, (plan, source) = on_worker(upstream, body["model"],
                                        partial(_start, body, upstream, call), call)
    release = releaser(upstream.controller, address)
    fmt = fmt or ChatChunks(new_id("chatcmpl-"), int(time.time()), body["model"],
                            body["include_usage"], call.service_tier)
    trackers = [TextTracker(plan.stops) for _ in range(n)]
    events = drive(source, fmt, trackers, UsageTally(n, [plan.prompt_tokens]), call,
                   body["include_usage"])
    return events, [source.close, release]


def _admit(body: ChatRequest, upstream: Upstream, call: Call) -> None:
    """The key's limits let the request in (its reply capped by its budget)."""
    cap = call.admit(body["model"], body["max_tokens"], generations(body["n"], body["best_of"]),
                     upstream.context_length(body["model"]), body["service_tier"])
    if cap is not None:
        body["max_tokens"] = cap


def _start(body: ChatRequest, upstream: Upstream, call: Call,
           address: str) -> tuple[ChatPlan, WorkerStreams]:
    plan = _plan(body, upstream, call, address)
    return plan, open_streams(upstream, call, address, [plan.params], body["n"])


def _plan(body: ChatRequest, upstream: Upstream, call: Call, address: str) -> ChatPlan:
    model = body["model"]
    messages = body["messages"]
    if not isinstance(messages, str):
        _check_images(messages, upstream, model)
    details = text_model_details(upstream, call, address, model)
    features = _features(body, details.capabilities, model)
    stop = list(body["stop"])
    stop_token_ids = None
    images: list[str] = []
    if RENDERS_MESSAGES in details.capabilities and not isinstance(messages, str):
        prompt = ""  # the worker applies its own chat template to "messages"
    else:
        with call.waiting_upstream():
            template = upstream.workers.template(address, model)
        prompt, images = _prompt(template, messages)
        stop += stop_strings(template)
        stop_token_ids = template.get("stop_token_ids")
    max_new_tokens, prompt_tokens = token_budget(
        upstream, call, address, model, details, prompt, body["max_tokens"], "messages")
    params = sampling_params(body, stop, stop_token_ids, details.capabilities)
    params["prompt"] = prompt
    params["max_new_tokens"] = max_new_tokens
    if images:
        params["images"] = [_image_payload(url) for url in images]
    if not isinstance(messages, str):
        params["messages"] = messages
    params.update(features)
    return ChatPlan(params, list(body["stop"]), prompt_tokens)


# OpenAI chat features a FastChat worker may list among its capabilities: request field ->
# capability. Without it, asking for the feature is a 400 naming the field.
FEATURES = {"tools": TOOLS, "functions": FUNCTIONS, "response_format": RESPONSE_FORMAT,
            "guided_json": GUIDED, "guided_regex": GUIDED, "guided_choice": GUIDED,
            "logprobs": LOGPROBS}


def _features(body: ChatRequest, capabilities: frozenset[str],
              model: str) -> dict[str, Any]:
    """The asked-for features this worker supports, as worker params; a 400 for the first
    one it does not."""
    asked: dict[str, Any] = {}
    if body["tools"] and body["tool_choice"] != "none":
        asked["tools"] = body["tools"]
        if body["tool_choice"] is not None:
            asked["tool_choice"] = body["tool_choice"]
        if body["parallel_tool_calls"] is not None:
            asked["parallel_tool_calls"] = body["parallel_tool_calls"]
    if body["functions"]:
        asked["functions"] = body["functions"]
    format_ = body["response_format"]
    if format_ is not None and format_["type"] != "text":
        asked["response_format"] = format_
    for guided in ("guided_json", "guided_regex", "guided_choice"):
        if body[guided] is not None:
            asked[guided] = body[guided]
    if body["logprobs"]:
        asked["logprobs"] = True
        asked["top_logprobs"] = body["top_logprobs"] or 0
    for field, capability in FEATURES.items():
        if field in asked and capability not in capabilities:
            if field == "functions" and TOOLS in capabilities:
                raise InvalidRequest("'functions' is deprecated and this model's worker does "
                                     "not take it: send 'tools' instead.", field)
            raise InvalidRequest(
                f"The model '{model}' is served by a FastChat worker that does not support "
                f"'{field}'; send the request without it, or use a model served by an "
                "OpenAI-compatible upstream (vLLM, llama.cpp, Ollama...).", field)
    return asked


def _prompt(template: dict[str, Any], messages: list[ChatMessage] | str) -> tuple[str, list[str]]:
    if isinstance(messages, str):
        return messages, []
    try:
        return render(template, messages)
    except TemplateError as exc:
        raise UpstreamError(f"The model worker's conversation template is unusable: {exc}") \
            from None


def _check_images(messages: list[ChatMessage], upstream: Upstream, model: str) -> None:
    for index, message in enumerate(messages):
        if message.get("images") and not upstream.controller.is_multimodal(model):
            raise InvalidRequest(f"The model '{model}' does not accept images.",
                                 f"messages[{index}].content")


def _image_payload(url: str) -> str:
    """FastChat's vision workers take base64 image data; data: URLs are unwrapped."""
    if url.startswith("data:") and ";base64," in url:
        return url.split(";base64,", 1)[1]
    return url


class ChatChunks:
    """chat.completion.chunk events, built from byte templates prepared once per stream."""

    closing = DONE

    def __init__(self, completion_id: str, created: int, model: str,
                 include_usage: bool, service_tier: str = "default") -> None:
        self._head = (b'data: {"id":' + orjson.dumps(completion_id)
                      + b',"object":"chat.completion.chunk","created":' + str(created).encode()
                      + b',"model":' + orjson.dumps(model) + b',"service_tier":'
                      + orjson.dumps(service_tier) + b',"system_fingerprint":null,')
        self._tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"
        self._prefixes: dict[int, bytes] = {}

    def _prefix(self, index: int) -> bytes:
        prefix = self._prefixes.get(index)
        if prefix is None:
            prefix = self._head + b'"choices":[{"index":' + str(index).encode() + b',"delta":'
            self._prefixes[index] = prefix
        return prefix

    def opening(self, index: int) -> bytes:
        return (self._prefix(index) + b'{"role":"assistant","content":""}'
                + b',"logprobs":null,"finish_reason":null}]' + self._tail)

    def delta(self, index: int, text: str, frame: dict[str, Any]) -> bytes:
        return (self._prefix(index) + b'{"content":' + orjson.dumps(text)
                + b'},"logprobs":null,"finish_reason":null}]' + self._tail)

    def tool_calls(self, index: int, deltas: list[dict[str, Any]]) -> bytes:
        return (self._prefix(index) + b'{"tool_calls":' + orjson.dumps(deltas)
                + b'},"logprobs":null,"finish_reason":null}]' + self._tail)

    def finish(self, index: int, reason: str) -> bytes:
        return (self._prefix(index) + b'{},"logprobs":null,"finish_reason":'
                + orjson.dumps(reason) + b"}]" + self._tail)

    def usage(self, usage: dict[str, int]) -> bytes:
        return self._head + b'"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n"

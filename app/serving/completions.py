"""Text completions: prompts -> worker params -> completion dict or SSE bytes.

Each prompt is sent as it is (no template), but the worker's template still adds its stop
strings and stop token ids, as FastChat does. Choice ``index`` is
``prompt_index * n + choice_index``, so it never collides across prompts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import orjson

from app.errors import InvalidRequest
from app.protocol.capabilities import GUIDED, RENDERS_MESSAGES
from app.protocol.stop_strings import TextTracker, final_text
from app.serving.call import Call
from app.serving.events import DONE
from app.serving.ids import new_id
from app.serving.prompt import stop_strings
from app.serving.stream_driver import drive
from app.serving.token_budget import token_budget
from app.serving.usage import UsageTally
from app.serving.worker_calls import (generate_all, on_worker, open_streams,
                                      sampling_params, text_model_details)
from app.serving.worker_streams import WorkerStreams
from app.upstream.clients import Upstream
from app.upstream.failover import releaser
from schemas import CompletionRequest
from schemas.sampling import generations


@dataclass
class PromptPlan:
    params: dict[str, Any]
    floor: int  # with echo, stop strings are looked for after the prompt
    prompt_tokens: int | None


def complete(body: CompletionRequest, upstream: Upstream, call: Call) -> dict[str, Any]:
    _admit(body, upstream, call)
    n = body["n"]

    def attempt(address: str) -> tuple[list[PromptPlan], list[dict[str, Any]]]:
        plans = _plans(body, upstream, call, address)
        return plans, generate_all(upstream, call, address, [p.params for p in plans], n)

    address, (plans, frames) = on_worker(upstream, body["model"], attempt, call)
    upstream.controller.release(address)
    usage = UsageTally(n, [plan.prompt_tokens for plan in plans])
    with_logprobs = body["logprobs"] is not None
    choices = []
    for index, frame in enumerate(frames):
        usage.record(index, frame)
        text, reason = final_text(frame, body["stop"], plans[index // n].floor)
        choices.append({"index": index, "text": text,
                        "logprobs": frame.get("logprobs") if with_logprobs else None,
                        "finish_reason": reason})
    totals = usage.total()
    call.meter.report(totals["prompt_tokens"], totals["completion_tokens"])
    call.release_slot(totals["total_tokens"])  # the worker is done: its slot goes on now
    return {"id": new_id("cmpl-"), "object": "text_completion", "created": int(time.time()),
            "model": body["model"], "choices": choices, "usage": totals,
            "service_tier": call.service_tier}


def open_stream(body: CompletionRequest, upstream: Upstream,
                call: Call) -> tuple[Iterator[bytes | None], list[Callable[[], object]]]:
    _admit(body, upstream, call)
    n = body["n"]
    address, (plans, source) = on_worker(upstream, body["model"],
                                         partial(_start, body, upstream, call), call)
    release = releaser(upstream.controller, address)
    fmt = CompletionChunks(new_id("cmpl-"), int(time.time()), body["model"],
                           body["include_usage"], body["logprobs"] is not None,
                           call.service_tier)
    usage = UsageTally(n, [p.prompt_tokens for p in plans])
    events = drive(source, fmt, _trackers(body, plans), usage, call, body["include_usage"])
    return events, [source.close, release]


def _admit(body: CompletionRequest, upstream: Upstream, call: Call) -> None:
    """The key's limits let the request in: each prompt's ``n`` choices generate at once
    (its reply capped by its budget)."""
    per_prompt = generations(body["n"], body["best_of"])
    cap = call.admit(body["model"], body["max_tokens"], per_prompt * len(body["prompt"]),
                     upstream.context_length(body["model"]), body["service_tier"])
    if cap is not None:
        body["max_tokens"] = cap


def _start(body: CompletionRequest, upstream: Upstream, call: Call,
           address: str) -> tuple[list[PromptPlan], WorkerStreams]:
    plans = _plans(body, upstream, call, address)
    source = open_streams(upstream, call, address, [plan.params for plan in plans],
                          body["n"])
    return plans, source


def _trackers(body: CompletionRequest, plans: list[PromptPlan]) -> list[TextTracker]:
    return [TextTracker(body["stop"], plan.floor) for plan in plans for _ in range(body["n"])]


def _plans(body: CompletionRequest, upstream: Upstream, call: Call,
           address: str) -> list[PromptPlan]:
    model = body["model"]
    details = text_model_details(upstream, call, address, model)
    stop = list(body["stop"])
    stop_token_ids = None
    if RENDERS_MESSAGES not in details.capabilities:
        with call.waiting_upstream():
            template = upstream.workers.template(address, model)
        stop += stop_strings(template)
        stop_token_ids = template.get("stop_token_ids")
    base = sampling_params(body, stop, stop_token_ids, details.capabilities)
    base["echo"] = body["echo"]
    base["logprobs"] = body["logprobs"]
    if body["best_of"] is not None:
        base["best_of"] = body["best_of"]
    if body["use_beam_search"] is not None:
        base["use_beam_search"] = body["use_beam_search"]
    base.update(_guided(body, details.capabilities, model))
    plans = []
    for prompt in body["prompt"]:
        max_new_tokens, prompt_tokens = token_budget(
            upstream, call, address, model, details, prompt, body["max_tokens"], "prompt")
        params = dict(base, prompt=prompt, max_new_tokens=max_new_tokens)
        plans.append(PromptPlan(params, len(prompt) if body["echo"] else 0, prompt_tokens))
    return plans


def _guided(body: CompletionRequest, capabilities: frozenset[str],
            model: str) -> dict[str, Any]:
    """vLLM's guided decoding parameters, for a worker that takes them; else a 400."""
    asked = {name: body[name] for name in ("guided_json", "guided_regex", "guided_choice")
             if body[name] is not None}
    if asked and GUIDED not in capabilities:
        raise InvalidRequest(f"The model '{model}' is served by a FastChat worker that does "
                             f"not support '{next(iter(asked))}'; send the request without it, "
                             "or use a model served by flaskchat's worker or vLLM.",
                             next(iter(asked)))
    return asked


class CompletionChunks:
    """text_completion chunks; logprobs carry only this chunk's tokens (FastChat's are
    cumulative)."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool,
                 with_logprobs: bool, service_tier: str = "default") -> None:
        self._head = (b'data: {"id":' + orjson.dumps(completion_id)
                      + b',"object":"text_completion","created":' + str(created).encode()
                      + b',"model":' + orjson.dumps(model) + b',"service_tier":'
                      + orjson.dumps(service_tier) + b",")
        self._tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"
        self._with_logprobs = with_logprobs
        self._tokens_sent: dict[int, int] = {}

    closing = DONE

    def opening(self, index: int) -> bytes:
        return b""

    def delta(self, index: int, text: str, frame: dict[str, Any]) -> bytes:
        logprobs = self._new_logprobs(index, frame.get("logprobs"))
        return self._choice(index, text, logprobs, None)

    def tool_calls(self, index: int, deltas: list[dict[str, Any]]) -> bytes:
        return b""  # text completions ask for no tools

    def finish(self, index: int, reason: str) -> bytes:
        return self._choice(index, "", None, reason)

    def usage(self, usage: dict[str, int]) -> bytes:
        return self._head + b'"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n"

    def _choice(self, index: int, text: str, logprobs: Any, reason: str | None) -> bytes:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        return self._head + b'"choices":[' + orjson.dumps(choice) + b"]" + self._tail

    def _new_logprobs(self, index: int, logprobs: Any) -> Any:
        if not self._with_logprobs or not isinstance(logprobs, dict):
            return None
        start = self._tokens_sent.get(index, 0)
        tokens = logprobs.get("tokens") or []
        self._tokens_sent[index] = len(tokens)
        return {key: value[start:] if isinstance(value, list) else value
                for key, value in logprobs.items()}

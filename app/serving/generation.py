"""What chat and text completions share: worker params, the token budget, failover, usage."""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Callable, Iterable, Protocol, Sequence, TypeVar, Union

from app.telemetry import metrics
from app.serving.call import Call
from app.errors import (APIError, ConnectTimedOut, ContextLengthExceeded, InvalidRequest,
                        WorkerUnreachable)
from app.serving.concurrency import run_all
from app.serving.sources import MergedSource, SingleSource
from app.protocol.stop_strings import INCOMPLETE_CHARACTER, cut_at_stop, finish_reason
from app.upstream import Upstream
from app.upstream.worker import EMBEDDING_ONLY, LENGTH_CHECK, WorkerDetails
from schemas import SamplingRequest

T = TypeVar("T")
K = TypeVar("K")
Source = Union[SingleSource, MergedSource]
log = logging.getLogger("flaskchat.generation")

WORKER_ATTEMPTS = 2  # a server that fails before answering is skipped, once


class Router(Protocol[K]):
    """Where a model's requests can go: FastChat workers (by address, through the
    controller) or OpenAI-compatible upstreams."""

    def acquire(self, model: str, exclude: Iterable[K] = ...) -> K: ...
    def release(self, key: K) -> None: ...
    def mark_failed(self, key: K, unreachable: bool = ...) -> None: ...


def with_failover(router: Router[K], model: str, attempt: Callable[[K], T],
                  forget: Callable[[K], None] | None = None) -> tuple[K, T]:
    """Runs ``attempt(key)`` on a server for ``model``. A server that refuses the
    connection, says nothing in time, or answers with a server error is marked unhealthy,
    and the attempt goes once to another server of the model, unseen by the client. The
    returned key is still acquired: release it."""
    tried: list[K] = []
    failure: APIError | None = None
    while True:
        try:
            key = router.acquire(model, exclude=tried)
        except APIError:
            if failure is not None:
                raise failure from None  # no other server: the first failure is the answer
            raise
        try:
            return key, attempt(key)
        except APIError as exc:
            router.release(key)
            if not exc.failover:
                raise
            # Refusing or not taking the connection means down; a slow or failed answer
            # may be this request's trouble, so such a server is only avoided.
            router.mark_failed(
                key, unreachable=isinstance(exc, (WorkerUnreachable, ConnectTimedOut)))
            if forget is not None:
                forget(key)
            tried.append(key)
            log.warning("%s failed for %s: %s", key, model, exc.message)
            metrics.count_upstream_error(exc)
            if len(tried) >= WORKER_ATTEMPTS:
                raise
            failure = exc
            metrics.RETRIES.labels(model).inc()
        except BaseException:
            router.release(key)
            raise


def on_worker(upstream: Upstream, model: str, attempt: Callable[[str], T]) -> tuple[str, T]:
    """``with_failover`` over the model's FastChat workers."""
    return with_failover(upstream.controller, model, attempt,
                         forget=lambda address: upstream.workers.forget(address, model))


def text_model_details(upstream: Upstream, call: Call, address: str,
                       model: str) -> WorkerDetails:
    """The worker's details, for chat and completions: an embedding model is a 400."""
    with call.waiting_upstream():
        details = upstream.workers.details(address, model)
    if EMBEDDING_ONLY in details.capabilities:
        raise InvalidRequest(f"The model '{model}' is an embedding model; it cannot generate "
                             "text. Use it with /v1/embeddings.", "model")
    return details


def generate_all(upstream: Upstream, call: Call, address: str,
                 params: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The final frame of every prompt's ``n`` choices (non-stream), generated at once.
    Nothing has reached the client yet, so any worker failure here may still fail over."""
    generate = upstream.workers.generate
    calls = [partial(generate, address, p, call.request_id, call.client_gone,
                     upstream.timing.tick) for p in params for _ in range(n)]
    with call.waiting_upstream():
        return run_all(calls)


def final_text(frame: dict[str, Any], stops: Sequence[str], floor: int = 0) -> tuple[str, str]:
    """A final frame's text, cut at the first stop string even if the worker ignored it,
    and its finish reason."""
    text, stopped = cut_at_stop(str(frame.get("text") or "").rstrip(INCOMPLETE_CHARACTER),
                                stops, floor)
    return text, "stop" if stopped else finish_reason(frame) or "stop"


def open_generations(upstream: Upstream, call: Call, address: str,
                     params: Sequence[dict[str, Any]], n: int) -> Source:
    """The worker streams for every prompt's ``n`` choices. The first is opened here, so
    that its failures (refused, HTTP 5xx, no answer in time) reach the caller, inside
    ``on_worker``'s failover; the rest are opened concurrently by the source."""
    with call.waiting_upstream():
        first = upstream.workers.open_stream(address, params[0], call.request_id)
    if len(params) * n == 1:
        return SingleSource(first, upstream.timing)
    openers = [partial(upstream.workers.open_stream, address, p, call.request_id)
               for p in params for _ in range(n)][1:]
    return MergedSource(first, openers, upstream.timing)


def once(function: Callable[[], object]) -> Callable[[], None]:
    """``function`` wrapped so that only its first call runs (close callbacks overlap)."""
    called = False

    def run() -> None:
        nonlocal called
        if not called:
            called = True
            function()
    return run


def sampling_params(body: SamplingRequest, stop: Sequence[str],
                    stop_token_ids: Any = None) -> dict[str, Any]:
    """The worker params every generation carries (FastChat's get_gen_params)."""
    params: dict[str, Any] = {
        "model": body["model"],
        "temperature": body["temperature"],
        "logprobs": None,
        "top_p": body["top_p"],
        "top_k": body["top_k"],
        "presence_penalty": body["presence_penalty"],
        "frequency_penalty": body["frequency_penalty"],
        "echo": False,
        "stop_token_ids": stop_token_ids,
        "stop": list(dict.fromkeys(stop)),
    }
    if body["repetition_penalty"] is not None:
        params["repetition_penalty"] = body["repetition_penalty"]
    if body["seed"] is not None:
        params["seed"] = body["seed"]
    return params


def token_budget(upstream: Upstream, call: Call, address: str, model: str,
                 details: WorkerDetails, prompt: str, max_tokens: int | None,
                 param: str) -> tuple[int, int | None]:
    """``(max_new_tokens, prompt_tokens)``. A worker that checks the length itself gets the
    request's limit unchecked (one fewer round trip); otherwise the prompt is counted and
    the limit clamped to the room left."""
    if LENGTH_CHECK in details.capabilities:
        return (max_tokens or details.context_length), None
    with call.waiting_upstream():
        prompt_tokens = upstream.workers.count_tokens(address, model, prompt, call.request_id)
    return clamp_to_context(details.context_length, prompt_tokens, max_tokens, param), \
        prompt_tokens


def clamp_to_context(context_length: int, prompt_tokens: int, max_tokens: int | None,
                     param: str) -> int:
    # One token is kept back: FastChat's worker keeps the last context - max_new_tokens - 1
    # prompt tokens, so a budget of context - prompt would silently drop the first one.
    room = context_length - prompt_tokens - 1
    if room <= 0:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context_length} tokens. However, your "
            f"messages resulted in {prompt_tokens} tokens. Please reduce the length of the "
            "messages.", param)
    return min(max_tokens, room) if max_tokens else room


class UsageTally:
    """Usage as OpenAI counts it: each prompt once, every choice's completion tokens."""

    def __init__(self, choices_per_prompt: int, prompt_tokens: Sequence[int | None]) -> None:
        self._per_prompt = choices_per_prompt
        self._known_prompt_tokens = list(prompt_tokens)
        self._last: dict[int, dict[str, Any]] = {}

    def record(self, index: int, frame: dict[str, Any]) -> None:
        usage = frame.get("usage")
        if isinstance(usage, dict):
            self._last[index] = usage

    def total(self) -> dict[str, int]:
        prompt = 0
        for group, known in enumerate(self._known_prompt_tokens):
            counted = [_count(self._last.get(group * self._per_prompt + i), "prompt_tokens")
                       for i in range(self._per_prompt)]
            prompt += max(counted + [known or 0])
        completion = sum(_count(u, "completion_tokens") for u in self._last.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


def completion_tokens(payload: dict[str, Any]) -> int:
    """``usage.completion_tokens`` of a worker frame or an OpenAI answer or chunk (0 if
    absent)."""
    usage = payload.get("usage")
    return _count(usage if isinstance(usage, dict) else None, "completion_tokens")


def _count(usage: dict[str, Any] | None, key: str) -> int:
    if not usage:
        return 0
    value = usage.get(key)
    return value if isinstance(value, int) and value >= 0 else 0

"""What chat and text completions ask of a model's FastChat workers, with failover: the
worker's details, the parameters every generation carries, the generations themselves."""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence, TypeVar

from app.errors import APIError, ClientClosedRequest, InvalidRequest
from app.protocol.capabilities import EMBEDDING_ONLY, GENERATE_PROGRESS, SAMPLING_DEFAULTS
from app.serving.call import Call
from app.serving.concurrency import run_all
from app.serving.queueing import CallQueue
from app.serving.usage import completion_tokens, prompt_tokens
from app.serving.worker_streams import WorkerStreams
from app.upstream.clients import Upstream
from app.upstream.failover import with_failover
from app.upstream.worker import WorkerDetails
from schemas import SamplingRequest

T = TypeVar("T")


def on_worker(upstream: Upstream, model: str, attempt: Callable[[str], T],
              call: Call | None = None,
              used: Callable[[T], float] | None = None) -> tuple[str, T]:
    """``with_failover`` over the model's FastChat workers; with ``call``, the attempt
    (a generation, embeddings) waits for a slot on a busy worker first. ``used``: the
    attempt's answer is all of it (embeddings), so its slot goes back as soon as it
    returns, counted at what ``used`` says; else the request gives it back."""
    queue = None if call is None else CallQueue(
        upstream.slots, call, lambda address: (address,
                                               upstream.worker_capacity(address, model)))
    key, result = with_failover(upstream.controller, model, attempt, upstream.failures,
                                forget=lambda address: upstream.workers.forget(address, model),
                                queue=queue, trace=call.trace if call is not None else None)
    if queue is not None and used is not None:
        queue.done(used(result))
    return key, result


def text_model_details(upstream: Upstream, call: Call, address: str,
                       model: str) -> WorkerDetails:
    """The worker's details, for chat and completions: an embedding model is a 400."""
    with call.waiting_upstream():
        details = upstream.workers.details(address, model)
    if EMBEDDING_ONLY in details.capabilities:
        raise InvalidRequest(f"The model '{model}' is an embedding model; it cannot generate "
                             "text. Use it with /v1/embeddings.", "model")
    return details


# FastChat's API server defaults, sent when the client leaves a setting out and the worker
# does not apply its model's own (SAMPLING_DEFAULTS)
FASTCHAT_SAMPLING = {"temperature": 0.7, "top_p": 1.0, "top_k": -1}


def sampling_params(body: SamplingRequest, stop: Sequence[str], stop_token_ids: Any = None,
                    capabilities: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The worker params every generation carries (FastChat's get_gen_params)."""
    params: dict[str, Any] = {
        "model": body["model"],
        "logprobs": None,
        "presence_penalty": body["presence_penalty"],
        "frequency_penalty": body["frequency_penalty"],
        "echo": False,
        "stop_token_ids": stop_token_ids,
        "stop": list(dict.fromkeys(stop)),
    }
    for name, default in FASTCHAT_SAMPLING.items():
        value = body[name]  # type: ignore[literal-required]
        if value is not None:
            params[name] = value
        elif SAMPLING_DEFAULTS not in capabilities:
            params[name] = default
    if body["repetition_penalty"] is not None:
        params["repetition_penalty"] = body["repetition_penalty"]
    if body["seed"] is not None:
        params["seed"] = body["seed"]
    return params


def generate_all(upstream: Upstream, call: Call, address: str,
                 params: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The final frame of every prompt's ``n`` choices (non-stream), generated at once.
    Nothing has reached the client yet, so any worker failure here may still fail over.
    A client that leaves is charged what each generation made by then."""
    generate = upstream.workers.generate
    progress = GENERATE_PROGRESS in upstream.workers.details(address, call.model).capabilities
    finished: list[dict[str, Any]] = []

    def left(frame: dict[str, Any]) -> None:
        call.meter.add(prompt_tokens(frame), completion_tokens(frame))

    def generation(one: dict[str, Any]) -> dict[str, Any]:
        frame = generate(address, one, call.request_id, call.client_gone, left, progress)
        finished.append(frame)
        return frame
    calls = [partial(generation, p) for p in params for _ in range(n)]
    try:
        with call.waiting_upstream():
            return run_all(calls)
    except ClientClosedRequest:
        for frame in finished:  # the others ended before the client left: made all that
            left(frame)
        raise
    except APIError:
        # This attempt failed (another worker may run it again): what its generations
        # that finished made is charged on top.
        if finished:
            call.meter.wasted(max(prompt_tokens(f) for f in finished),
                              sum(completion_tokens(f) for f in finished))
        raise


def open_streams(upstream: Upstream, call: Call, address: str,
                 params: Sequence[dict[str, Any]], n: int) -> WorkerStreams:
    """The worker streams for every prompt's ``n`` choices. The first is opened here, so
    that its failures (refused, HTTP 5xx, no answer in time) reach the caller, inside
    ``on_worker``'s failover; the rest are opened concurrently as they are read."""
    with call.waiting_upstream():
        first = upstream.workers.open_stream(address, params[0], call.request_id)
    openers = [partial(upstream.workers.open_stream, address, p, call.request_id)
               for p in params for _ in range(n)][1:]
    return WorkerStreams(first, openers, upstream.timing, call.client_gone)

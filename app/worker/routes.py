"""The model worker's HTTP API: FastChat's worker protocol.

Streams send their headers (and a bare NUL, which every frame parser skips) at once, then
wait for a slot, so a gateway can keep its client informed while the request is queued. A
bare NUL also goes out every second while nothing else does: a failed write is how a
client that went away is noticed, and generation stops within one token.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import orjson
from flask import Blueprint, Response, current_app, request
from flask.typing import ResponseReturnValue

from app.config import WorkerSettings
from app.errors import InvalidRequest
from app.protocol.capabilities import (EMBEDDING_ONLY, GENERATE_PROGRESS, GUIDED,
                                       LENGTH_CHECK, RENDERS_MESSAGES, RESPONSE_FORMAT,
                                       SAMPLING_DEFAULTS, TOOLS)
from app.protocol.error_codes import CUDA_OUT_OF_MEMORY, INTERNAL_ERROR
from app.protocol.frames import DELIMITER, encode_frame
from app.telemetry import tracing
from app.web.json_io import json_response, read_json_object
from app.web.request_id import HEADER as REQUEST_ID_HEADER
from app.web.request_id import is_sane_request_id
from app.web.validation import load
from app.worker.chat_model import ChatModel, PromptTooLong
from app.worker.generation import Job
from app.worker.embedding_model import EmbeddingModel
from app.worker.embedding_batching import Cancelled as EmbeddingCancelled
from app.worker.slots import Cancelled, Slots
from app.worker.structured.matchers import GrammarFailed
from schemas.worker import (EmbeddingParams, GenerationSchema, PromptSchema,
                            WorkerEmbeddingSchema)

log = logging.getLogger("flaskchat.worker")
bp = Blueprint("worker", __name__)
STATE = "flaskchat.worker"
PROBE_INTERVAL = 1.0
SPACE_INTERVAL = 0.25  # a non-stream answer's progress while tokens are being made
KEEPALIVE = b"\n"  # a non-stream answer's byte while nothing was made (progress: spaces)

_generation = GenerationSchema()
_embedding = WorkerEmbeddingSchema()
_prompt = PromptSchema()


@dataclass
class WorkerState:
    settings: WorkerSettings
    names: list[str]
    slots: Slots
    chat: ChatModel | None = None
    embedder: EmbeddingModel | None = None

    def status(self) -> dict[str, Any]:
        # limit_worker_concurrency: how many generations run at once, so that a gateway
        # holds the excess and shares it fairly (stock FastChat ignores the extra field).
        return {"model_names": self.names, "speed": 1, "queue_length": self.slots.queue_length,
                "limit_worker_concurrency": self.slots.limit}

    def require_chat(self) -> ChatModel:
        if self.chat is None:
            raise InvalidRequest("This worker serves an embedding model; it cannot generate.")
        return self.chat


def state() -> WorkerState:
    found: WorkerState = current_app.extensions[STATE]
    return found


@bp.get("/health")
def health() -> ResponseReturnValue:
    return json_response({"status": "ok"})


@bp.post("/worker_generate_stream")
def generate_stream() -> ResponseReturnValue:
    trace = _trace()
    job = _prepare(trace)
    if isinstance(job, Response):
        return job
    return Response(_stream(state(), job, _request_id(), trace),
                    content_type="application/octet-stream")


@bp.post("/worker_generate")
def generate() -> ResponseReturnValue:
    """The final frame as JSON. The headers go out at once, then whitespace until it is
    ready (JSON allows it before a value): every quarter second a space for each token
    made since (GENERATE_PROGRESS: a caller whose client left can charge what was made),
    and a newline each second nothing was. A failed write tells that the caller left,
    and the generation stops."""
    trace = _trace()
    job = _prepare(trace)
    if isinstance(job, Response):
        return job
    return Response(_final(state(), job, _request_id(), trace),
                    content_type="application/json")


@bp.post("/worker_get_embeddings")
def get_embeddings() -> ResponseReturnValue:
    """The vectors as JSON, after a newline each second they are not ready (JSON allows
    whitespace before a value): a failed write tells that the caller left, and the
    request's inputs leave the batcher's queue."""
    params = load(_embedding, read_json_object())
    worker = state()
    if worker.embedder is None:
        raise InvalidRequest("This worker serves a chat model; it has no embeddings.")
    return Response(_embeddings(worker, worker.embedder, params, _trace()),
                    content_type="application/json")


@bp.post("/count_token")
def count_token() -> ResponseReturnValue:
    prompt = load(_prompt, read_json_object())["prompt"]
    worker = state()
    if worker.chat is not None:
        count = len(worker.chat.encode(prompt))
    else:
        assert worker.embedder is not None
        count = worker.embedder.count(prompt)
    return json_response({"count": count, "error_code": 0})


@bp.post("/model_details")
def model_details() -> ResponseReturnValue:
    worker = state()
    model = worker.chat or worker.embedder
    assert model is not None
    # The worker checks the context length itself; with a chat template it also renders
    # the prompt from "messages" (see app.protocol.capabilities).
    capabilities = [LENGTH_CHECK]
    if worker.chat is None:
        capabilities.append(EMBEDDING_ONLY)
    else:
        if worker.chat.has_chat_template:  # tools go into the prompt through it
            capabilities += [RENDERS_MESSAGES, TOOLS]
        capabilities += [SAMPLING_DEFAULTS, GENERATE_PROGRESS, RESPONSE_FORMAT, GUIDED]
    return json_response({"context_length": model.context_length,
                          "capabilities": capabilities})


@bp.post("/worker_get_conv_template")
def conv_template() -> ResponseReturnValue:
    worker = state()
    conv = worker.chat.conv if worker.chat is not None else None
    return json_response({"conv": conv})


@bp.post("/worker_get_status")
def worker_get_status() -> ResponseReturnValue:
    return json_response(state().status())


def _trace() -> tracing.Trace | None:
    """The request's root span, continuing the gateway's trace (its ``traceparent``)."""
    if not tracing.ENABLED:
        return None
    return tracing.start(f"POST {request.path}", request.headers,
                         {"flaskchat.request_id": _request_id()})


def _prepare(trace: tracing.Trace | None) -> Job | Response:
    try:
        params = load(_generation, read_json_object())
        return state().require_chat().prepare(params)
    except PromptTooLong as exc:
        # Refused before any slot or header: a gateway can answer 400 at once.
        if trace is not None:
            tracing.close(trace.root, {"flaskchat.outcome": "prompt too long"}, str(exc))
        return json_response({"text": str(exc), "error_code": exc.code}, 400)
    except BaseException as exc:
        if trace is not None:
            tracing.close(trace.root, {"flaskchat.outcome": "refused"}, str(exc))
        raise


def _request_id() -> str:
    """The gateway's X-Request-Id, for this worker's log lines about the request."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if is_sane_request_id(given) else "-"


def _stream(worker: WorkerState, job: Job, request_id: str,
            trace: tracing.Trace | None) -> Iterator[bytes]:
    with _left_early(trace):
        yield DELIMITER  # the headers go out now, before the wait for a slot
    for frame in _frames(worker, job, request_id, trace, probe=DELIMITER):
        yield frame if isinstance(frame, bytes) else encode_frame(frame)


def _final(worker: WorkerState, job: Job, request_id: str,
           trace: tracing.Trace | None) -> Iterator[bytes]:
    with _left_early(trace):
        yield KEEPALIVE
    last: dict[str, Any] = {}
    written = time.monotonic()
    told = 0  # tokens the caller was told of
    for frame in _frames(worker, job, request_id, trace, probe=KEEPALIVE):
        if isinstance(frame, bytes):
            yield frame
            continue
        last = frame
        if time.monotonic() - written >= SPACE_INTERVAL:
            # Lets the caller look at its client (and us notice it left), and says how far
            # the generation got.
            written = time.monotonic()
            made = (frame.get("usage") or {}).get("completion_tokens") or 0
            yield b" " * (made - told) or KEEPALIVE
            told = max(made, told)
    yield orjson.dumps(last)


@contextmanager
def _left_early(trace: tracing.Trace | None) -> Iterator[None]:
    """Around a generation's first write: a caller gone by then ends the request's span
    here (its generation, which would, never starts)."""
    try:
        yield
    except GeneratorExit:
        if trace is not None:
            tracing.close(trace.root, {"flaskchat.outcome": "cancelled"})
        raise


def _frames(worker: WorkerState, job: Job, request_id: str, trace: tracing.Trace | None,
            probe: bytes) -> Iterator[dict[str, Any] | bytes]:
    """The generation's frames, from its own thread; ``probe`` whenever none came for a
    second. When the caller stops reading (the client left), the generation is cancelled."""
    cancel = threading.Event()
    frames: queue.Queue[dict[str, Any] | None] = queue.Queue()
    threading.Thread(target=_run, args=(worker, job, request_id, trace, cancel, frames),
                     daemon=True).start()
    try:
        while True:
            try:
                frame = frames.get(timeout=PROBE_INTERVAL)
            except queue.Empty:
                yield probe
                continue
            if frame is None:
                return
            yield frame
    finally:
        cancel.set()


def _run(worker: WorkerState, job: Job, request_id: str, trace: tracing.Trace | None,
         cancel: threading.Event, frames: queue.Queue[dict[str, Any] | None]) -> None:
    started = time.monotonic()
    arrived = time.time()
    last: dict[str, Any] = {}
    outcome = "cancelled"
    try:
        with worker.slots.slot(cancel):
            for frame in worker.require_chat().generate(job, cancel):
                last = frame
                frames.put(frame)
        outcome = str(last.get("finish_reason") or "stop")
    except Cancelled:
        pass
    except Exception as exc:
        outcome = type(exc).__name__
        frames.put(_error_frame(exc))
    finally:
        frames.put(None)
        usage = last.get("usage") or {}
        log.info("generation %s: %s prompt + %s completion tokens in %.2f s",
                 outcome, usage.get("prompt_tokens", len(job.input_ids)),
                 usage.get("completion_tokens", 0), time.monotonic() - started,
                 extra={"request_id": request_id})
        if trace is not None:
            _traced(trace, job, arrived, outcome, int(usage.get("completion_tokens") or 0))


def _traced(trace: tracing.Trace, job: Job, arrived: float, outcome: str,
            completion_tokens: int) -> None:
    """The generation's stages as spans under its root: the wait for a slot and a row,
    the prompt (how much the prefix cache held), the decoding (how many decoded with
    it). Written once it is over, from the times the engine noted."""
    timeline, ended = job.timeline, time.time()
    if timeline.started:
        trace.record("queue", arrived, timeline.started)
    if timeline.prompt_done:
        trace.record("prompt", timeline.started, timeline.prompt_done,
                     {"gen_ai.usage.input_tokens": len(job.input_ids),
                      "flaskchat.prompt.cached_tokens": timeline.cached_tokens})
        trace.record("decode", timeline.prompt_done, ended,
                     {"gen_ai.usage.output_tokens": completion_tokens,
                      "flaskchat.batch.peak": timeline.batch_peak})
    failed = outcome not in ("stop", "length", "tool_calls", "cancelled")
    tracing.close(trace.root, {"flaskchat.outcome": outcome,
                               "gen_ai.usage.input_tokens": len(job.input_ids),
                               "gen_ai.usage.output_tokens": completion_tokens},
                  outcome if failed else None)


def _embeddings(worker: WorkerState, embedder: EmbeddingModel, params: EmbeddingParams,
                trace: tracing.Trace | None) -> Iterator[bytes]:
    cancel = threading.Event()
    answer: list[bytes] = []

    def work() -> None:
        token_num, outcome = 0, "cancelled"
        try:
            with worker.slots.slot(cancel):
                vectors, token_num = embedder.embed(params["input"], cancel)
            outcome = "done"
            embedding: Any = vectors
            if params["encoding_format"] == "base64":
                embedding = [EmbeddingModel.as_base64(vector) for vector in vectors]
            answer.append(orjson.dumps({"embedding": embedding, "token_num": token_num},
                                       option=orjson.OPT_SERIALIZE_NUMPY))
        except (Cancelled, EmbeddingCancelled):
            pass
        except Exception as exc:
            outcome = type(exc).__name__
            answer.append(orjson.dumps(_error_frame(exc)))
        finally:
            if trace is not None:
                tracing.close(trace.root, {"flaskchat.outcome": outcome,
                                           "flaskchat.inputs": len(params["input"]),
                                           "gen_ai.usage.input_tokens": token_num},
                              outcome if outcome not in ("done", "cancelled") else None)
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(PROBE_INTERVAL)
            if thread.is_alive():
                yield KEEPALIVE
        yield from answer
    finally:
        cancel.set()


def _error_frame(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, GrammarFailed):  # the request's format, not the worker
        return {"text": str(exc), "error_code": exc.code}
    out_of_memory = isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
    if not out_of_memory:
        log.exception("generation failed")
    return {"text": f"**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS "
                    f"PAGE.**\n\n({type(exc).__name__}: {exc})",
            "error_code": CUDA_OUT_OF_MEMORY if out_of_memory else INTERNAL_ERROR}

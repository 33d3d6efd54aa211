"""Embeddings: inputs in batches (sent concurrently, each to its own worker), float or base64."""
from __future__ import annotations

import base64
import struct
from functools import partial
from typing import Any

from app.errors import InvalidRequest, UpstreamError
from app.serving.call import Call
from app.serving.concurrency import run_all
from app.serving.worker_calls import on_worker
from app.upstream.clients import Upstream
from schemas import EmbeddingRequest


def embed(body: EmbeddingRequest, path_model: str | None, upstream: Upstream,
          call: Call) -> dict[str, Any]:
    model = body["model"] or path_model
    if not model:
        raise InvalidRequest("Missing required parameter: 'model'.", "model")
    call.admit(model, max_tokens=0)  # nothing is generated: the key pays for its inputs
    upstream.controller.require_model(model)
    size = upstream.settings.embedding_batch_size
    inputs = body["input"]
    batches = [inputs[start:start + size] for start in range(0, len(inputs), size)]
    with call.waiting_upstream():
        results = run_all([partial(_embed_batch, upstream, call, model, batch)
                           for batch in batches])
    data: list[dict[str, Any]] = []
    tokens = 0
    for number, (batch, result) in enumerate(zip(batches, results)):
        vectors = result.get("embedding")
        if not isinstance(vectors, list) or len(vectors) != len(batch):
            raise UpstreamError("The model worker returned the wrong number of embeddings.")
        for position, vector in enumerate(vectors):
            data.append({"object": "embedding", "index": number * size + position,
                         "embedding": _encode(vector, body["encoding_format"])})
        token_num = result.get("token_num")
        tokens += token_num if isinstance(token_num, int) else 0
    call.meter.report(tokens, 0)
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _embed_batch(upstream: Upstream, call: Call, model: str,
                 batch: list[str]) -> dict[str, Any]:
    # Floats are always requested: a worker's own base64 is its tensor's raw bytes, which
    # are float16 for some models (FastChat weakness), so we encode float32 ourselves.
    payload = {"model": model, "input": batch, "encoding_format": None}
    address, result = on_worker(upstream, model, partial(
        upstream.workers.embeddings, payload=payload, request_id=call.request_id), call,
        used=_tokens)
    upstream.controller.release(address)
    return result


def _tokens(result: dict[str, Any]) -> float:
    """What a batch of embeddings used: its inputs' tokens."""
    count = result.get("token_num")
    return count if isinstance(count, int) else 0


def _encode(vector: Any, encoding_format: str) -> Any:
    if not isinstance(vector, list):
        raise UpstreamError("The model worker returned an embedding that is not a list.")
    if encoding_format == "float":
        return vector
    try:
        packed = struct.pack(f"<{len(vector)}f", *vector)  # little-endian float32
    except (struct.error, TypeError):
        raise UpstreamError("The model worker returned an embedding with non-numbers.") \
            from None
    return base64.b64encode(packed).decode("ascii")

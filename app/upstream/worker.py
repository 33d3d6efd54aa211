"""WorkerClient: every call the gateway makes to a FastChat-protocol model worker.

A worker's conversation template and details (context length, capabilities) are cached
per (worker, model) and refreshed in the background, so a steady-state chat request makes
one or two worker calls: ``/count_token`` (only for workers that do not check the context
length themselves) and the generation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import requests

from app import errors
from app.upstream.cache import RefreshingCache
from app.protocol.frames import FrameError, decode_frame, iter_frame_batches
from app.upstream.session import mapped_errors, post_json

# Capabilities a worker may list in its /model_details answer under "capabilities".
# "length_check": the worker enforces the context length itself and answers 40303.
# "messages": the worker renders the prompt from the "messages" field (own chat template).
LENGTH_CHECK = "length_check"
RENDERS_MESSAGES = "messages"
VISION = "vision"
# "embedding_only": an embedding model; chat and completions get a 400 instead of a try.
EMBEDDING_ONLY = "embedding_only"

Key = tuple[str, str]  # (worker address, model)


@dataclass(frozen=True)
class Timing:
    """How long a stream may keep a request waiting."""

    tick: float  # how often a silent stream reports in to its reader
    first_token: float  # the longest wait for a stream's first frame
    between_tokens: float  # the longest wait for any later read


@dataclass(frozen=True)
class WorkerDetails:
    context_length: int
    capabilities: frozenset[str] = frozenset()


class WorkerClient:
    def __init__(self, session: requests.Session, timeouts: tuple[float, float],
                 info_ttl: float, first_token_timeout: float | None = None,
                 generation_timeout: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._session = session
        self._timeouts = timeouts
        # A stream's head may come only once the worker has a free slot (FastChat's worker
        # queues before answering), so it may take as long as the first token.
        self._stream_timeouts = (timeouts[0], first_token_timeout or timeouts[1])
        # A stock FastChat worker answers /worker_generate only when the whole generation
        # is done; flaskchat's sends its headers at once.
        self._generate_timeouts = (timeouts[0], generation_timeout or timeouts[1])
        self._templates: RefreshingCache[Key, dict[str, Any]] = RefreshingCache(
            self._fetch_template, info_ttl, clock)
        self._details: RefreshingCache[Key, WorkerDetails] = RefreshingCache(
            self._fetch_details, info_ttl, clock)

    # ---- cached facts ---------------------------------------------------------------

    def template(self, address: str, model: str) -> dict[str, Any]:
        return self._templates.get((address, model))

    def details(self, address: str, model: str) -> WorkerDetails:
        return self._details.get((address, model))

    def forget(self, address: str, model: str) -> None:
        """Drops what is cached about a worker that failed (it may come back different)."""
        self._templates.invalidate((address, model))
        self._details.invalidate((address, model))

    def _fetch_template(self, key: Key) -> dict[str, Any]:
        body = self._post_json(key[0], "/worker_get_conv_template", {"model": key[1]}, None)
        conv = body.get("conv")
        if not isinstance(conv, dict):
            raise errors.UpstreamError(f"The model worker for '{key[1]}' has no conversation "
                                       "template (is it an embedding model?).")
        return conv

    def _fetch_details(self, key: Key) -> WorkerDetails:
        body = self._post_json(key[0], "/model_details", {"model": key[1]}, None)
        try:
            context_length = int(body["context_length"])
        except (KeyError, TypeError, ValueError):
            raise errors.UpstreamError("The worker's /model_details has no context_length.") \
                from None
        capabilities = body.get("capabilities") or ()
        return WorkerDetails(context_length, frozenset(str(c) for c in capabilities))

    # ---- per-request calls ------------------------------------------------------------

    def count_tokens(self, address: str, model: str, prompt: str, request_id: str) -> int:
        body = self._post_json(address, "/count_token", {"model": model, "prompt": prompt},
                               request_id)
        raise_for_frame(body)
        try:
            return int(body["count"])
        except (KeyError, TypeError, ValueError):
            raise errors.UpstreamError("The worker's /count_token answer has no count.") \
                from None

    def generate(self, address: str, params: dict[str, Any], request_id: str,
                 client_gone: Callable[[], bool], check_every: float) -> dict[str, Any]:
        """/worker_generate's final frame. Read as a stream: flaskchat's worker sends a space
        every second while it generates, so a client that left is noticed (and the
        request closed, which cancels the generation) and a silent worker times out."""
        with mapped_errors("the model worker"):
            response = post_json(self._session, address + "/worker_generate", params,
                                 self._generate_timeouts, stream=True,
                                 headers={"X-Request-Id": request_id})
            try:
                if response.status_code != 200:
                    raise _status_error(response)
                set_timeout = getattr(response.raw, "set_timeout", None)
                if set_timeout is not None:
                    set_timeout(self._timeouts[1])
                body = []
                checked = time.monotonic()
                for chunk in response.iter_content(chunk_size=None):
                    body.append(chunk)
                    if time.monotonic() - checked >= check_every:
                        checked = time.monotonic()
                        if client_gone():
                            raise errors.ClientClosedRequest("The client closed the "
                                                             "connection.")
            finally:
                response.close()
        try:
            frame = decode_frame(b"".join(body))
        except FrameError:
            raise errors.UpstreamError("The model worker answered /worker_generate with "
                                       "invalid JSON.") from None
        raise_for_frame(frame)
        return frame

    def embeddings(self, address: str, payload: dict[str, Any],
                   request_id: str) -> dict[str, Any]:
        body = self._post_json(address, "/worker_get_embeddings", payload, request_id)
        raise_for_frame(body)
        return body

    def open_stream(self, address: str, params: dict[str, Any],
                    request_id: str) -> requests.Response:
        """The open /worker_generate_stream response, its status checked; close it when done."""
        with mapped_errors("the model worker"):
            response = post_json(self._session, address + "/worker_generate_stream", params,
                                 self._stream_timeouts, stream=True,
                                 headers={"X-Request-Id": request_id})
        if response.status_code != 200:
            error = _status_error(response)
            response.close()
            raise error
        return response

    @staticmethod
    def frame_batches(response: requests.Response) -> Iterator[list[dict[str, Any]]]:
        """The stream's frames, a list per read; errors (including ``error_code`` frames)
        as our exceptions."""
        with mapped_errors("the model worker"):
            try:
                for batch in iter_frame_batches(response.iter_content(chunk_size=None)):
                    for position, frame in enumerate(batch):
                        if frame.get("error_code"):
                            if position:  # what came before the error still counts
                                yield batch[:position]
                            raise_for_frame(frame)
                    yield batch
            except FrameError as exc:
                raise errors.UpstreamError(f"The model worker sent a malformed stream: {exc}.") \
                    from None

    def _post_json(self, address: str, path: str, payload: dict[str, Any],
                   request_id: str | None) -> dict[str, Any]:
        headers = {"X-Request-Id": request_id} if request_id else None
        with mapped_errors("the model worker"):
            response = post_json(self._session, address + path, payload, self._timeouts,
                                 headers=headers)
            if response.status_code != 200:
                raise _status_error(response)
            try:
                return decode_frame(response.content)
            except FrameError:
                raise errors.UpstreamError(f"The model worker answered {path} with invalid "
                                           "JSON.") from None


def raise_for_frame(frame: dict[str, Any]) -> None:
    """Raises the exception for a frame whose ``error_code`` is not 0."""
    code = frame.get("error_code", 0)
    if not code:
        return
    text = str(frame.get("text") or "The model worker reported an error.")
    try:
        numeric = int(code)
    except (TypeError, ValueError):
        numeric = errors.INTERNAL_ERROR
    raise _code_error(numeric, text)


def _code_error(code: int, text: str) -> errors.APIError:
    error: errors.APIError
    if code == errors.CONTEXT_OVERFLOW:
        error = errors.ContextLengthExceeded(text, "messages")
    elif code == errors.INVALID_MODEL:
        error = errors.ModelNotFound(text, "model")
    elif 40000 <= code < 41000 and code != 40101:
        error = errors.InvalidRequest(text)
    elif code in (errors.RATE_LIMIT, 42902):
        error = errors.Overloaded(text)
    elif code == errors.CUDA_OUT_OF_MEMORY:
        error = errors.WorkerOutOfMemory(text)
    elif code in (errors.ENGINE_OVERLOADED, errors.CONTROLLER_NO_WORKER):
        error = errors.UpstreamUnavailable(text)
    elif code == errors.CONTROLLER_WORKER_TIMEOUT:
        error = errors.UpstreamTimeout(text)
    else:
        error = errors.UpstreamError(text)
    error.fastchat_code = code
    return error


def _status_error(response: requests.Response) -> errors.APIError:
    """The error for a non-200 answer. A worker may explain itself with an error frame
    (flaskchat's worker refuses an over-long prompt with 400 and code 40303)."""
    try:
        body = next(response.iter_content(4096), b"")  # never a whole hostile body
    except requests.RequestException:
        body = b""
    try:
        frame = decode_frame(body)
        raise_for_frame(frame)
    except errors.APIError as exc:
        return exc
    except FrameError:
        frame = {}
    status = response.status_code
    explained = _explanation(frame)
    if explained is not None and 400 <= status < 500 and status != 429:
        # The worker refused the request itself, in the error envelope (flaskchat's worker).
        return errors.PayloadTooLarge(explained[0]) if status == 413 \
            else errors.InvalidRequest(*explained)
    detail = " ".join(body[:300].decode("utf-8", "replace").split())
    message = f"The model worker answered with HTTP {status}" + (f": {detail}" if detail else ".")
    error: errors.APIError
    if status == 429:
        error = errors.Overloaded(message)
    elif status in (502, 503):
        error = errors.UpstreamUnavailable(message)
    elif status == 504:
        error = errors.UpstreamTimeout(message)
    else:
        error = errors.UpstreamError(message)
    error.failover = status >= 500  # the worker is in trouble, not the request
    return error


def _explanation(body: Any) -> tuple[str, str | None] | None:
    """(message, param) of an error envelope body, if it is one."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None
    param = error.get("param")
    return error["message"], param if isinstance(param, str) else None

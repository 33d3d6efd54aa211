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
from app.protocol import error_codes
from app.protocol.frames import Frame, FrameDecoder, FrameError, decode_frame
from app.upstream.cache import RefreshingCache
from app.upstream.session import mapped_errors, post_json
from app.upstream.stream import MAX_BODY, RawChunks, Timing, UpstreamStream, follow

WORKER = "the model worker"
Key = tuple[str, str]  # (worker address, model)


@dataclass(frozen=True)
class WorkerDetails:
    context_length: int
    capabilities: frozenset[str] = frozenset()


class WorkerClient:
    """``timing`` bounds a generation's waits: its first token (queueing included) and
    each later read; a stock FastChat worker answers /worker_generate only when the whole
    generation is done, so that call's head may take ``generation_timeout``."""

    def __init__(self, session: requests.Session, timeouts: tuple[float, float],
                 info_ttl: float, timing: Timing, generation_timeout: float,
                 status_ttl: float = 3.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._session = session
        self._timeouts = timeouts
        self.timing = timing
        # A stream's head may come only once the worker has a free slot (FastChat's worker
        # queues before answering), so it may take as long as the first token.
        self._stream_timeouts = (timeouts[0], timing.first_token)
        self._generate_timeouts = (timeouts[0], generation_timeout)
        # Reading a generation nobody waits for any more (its client left): as long as a
        # stock worker may take to answer.
        self._unattended = Timing(timing.tick, generation_timeout, generation_timeout)
        self._templates: RefreshingCache[Key, dict[str, Any]] = RefreshingCache(
            self._fetch_template, info_ttl, clock)
        self._details: RefreshingCache[Key, WorkerDetails] = RefreshingCache(
            self._fetch_details, info_ttl, clock)
        self._context_lengths: dict[str, int] = {}  # model -> as its workers last said
        # What each worker says it runs at once (limit_worker_concurrency in its status):
        # refreshed as often as the worker list, so a change applies within one refresh.
        self._capacities: RefreshingCache[str, int | None] = RefreshingCache(
            self._fetch_capacity, status_ttl, clock)

    # ---- cached facts ---------------------------------------------------------------

    def template(self, address: str, model: str) -> dict[str, Any]:
        return self._templates.get((address, model))

    def details(self, address: str, model: str) -> WorkerDetails:
        return self._details.get((address, model))

    def context_length(self, model: str) -> int | None:
        """The model's context length as a worker of it last said (None: not asked yet)."""
        return self._context_lengths.get(model)

    def capacity(self, address: str) -> int | None:
        """How many generations the worker says it runs at once (None: it does not say,
        as a stock FastChat worker, or cannot be asked now)."""
        try:
            return self._capacities.get(address)
        except errors.APIError:
            return None

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

    def _fetch_capacity(self, address: str) -> int | None:
        value = self._post_json(address, "/worker_get_status", {}, None).get(
            "limit_worker_concurrency")
        return value if isinstance(value, int) and not isinstance(value, bool) \
            and value >= 1 else None

    def _fetch_details(self, key: Key) -> WorkerDetails:
        body = self._post_json(key[0], "/model_details", {"model": key[1]}, None)
        try:
            context_length = int(body["context_length"])
        except (KeyError, TypeError, ValueError):
            raise errors.UpstreamError("The worker's /model_details has no context_length.") \
                from None
        capabilities = body.get("capabilities") or ()
        self._context_lengths[key[1]] = context_length
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
                 client_gone: Callable[[], bool], left: Callable[[Frame], None],
                 progress: bool = False) -> Frame:
        """/worker_generate's final frame, read as a stream: flaskchat's worker sends its
        headers at once and whitespace while it generates, so a client that left is
        noticed, and a silent worker times out.

        When the client leaves, ``left`` hears what the generation made (a frame with its
        usage) before ClientClosedRequest is raised: a worker with ``progress``
        (GENERATE_PROGRESS) stops when the request is closed and has said how many tokens
        it made (a space each); any other goes on generating whatever we do (a stock
        FastChat worker), so its answer is read to the end and its usage is what it made.
        """
        response = self._open(address + "/worker_generate", params, self._generate_timeouts,
                              request_id)
        stream = UpstreamStream(response, RawChunks(), WORKER)
        body = bytearray()
        try:
            try:
                _read_into(body, follow(stream, self.timing, client_gone,
                                        watch_throughout=True))
            except errors.ClientClosedRequest:
                if progress:
                    left({"usage": {"completion_tokens": _progress(body)}})
                    raise
                _read_into(body, follow(stream, self._unattended))
                left(_final_frame(bytes(body)))
                raise
        finally:
            stream.close()
        return _final_frame(bytes(body))

    def embeddings(self, address: str, payload: dict[str, Any],
                   request_id: str) -> dict[str, Any]:
        body = self._post_json(address, "/worker_get_embeddings", payload, request_id)
        raise_for_frame(body)
        return body

    def open_stream(self, address: str, params: dict[str, Any],
                    request_id: str) -> UpstreamStream[Frame]:
        """The open /worker_generate_stream answer, its status checked; close it when
        done."""
        response = self._open(address + "/worker_generate_stream", params,
                              self._stream_timeouts, request_id)
        return UpstreamStream(response, WorkerFrames(), WORKER)

    def _open(self, url: str, params: dict[str, Any], timeouts: tuple[float, float],
              request_id: str) -> requests.Response:
        """A generation's answer with its body unread, after a 200 (else our error)."""
        with mapped_errors(WORKER):
            response = post_json(self._session, url, params, timeouts, stream=True,
                                 headers={"X-Request-Id": request_id})
        if response.status_code != 200:
            error = _status_error(response)
            response.close()
            raise error
        return response

    def _post_json(self, address: str, path: str, payload: dict[str, Any],
                   request_id: str | None) -> dict[str, Any]:
        headers = {"X-Request-Id": request_id} if request_id else None
        with mapped_errors(WORKER):
            response = post_json(self._session, address + path, payload, self._timeouts,
                                 headers=headers)
            if response.status_code != 200:
                raise _status_error(response)
            try:
                return decode_frame(response.content)
            except FrameError:
                raise errors.UpstreamError(f"The model worker answered {path} with invalid "
                                           "JSON.") from None


def _read_into(body: bytearray, batches: Iterator[list[bytes] | None]) -> None:
    for batch in batches:
        for data in batch or ():
            body += data
            if len(body) > MAX_BODY:
                raise errors.UpstreamError(f"The model worker sent an answer over {MAX_BODY} "
                                           "bytes.")


def _progress(body: bytearray) -> int:
    """Tokens a GENERATE_PROGRESS worker said it made: the spaces before its answer."""
    answer = body.lstrip()
    return body[:len(body) - len(answer)].count(b" ")


def _final_frame(body: bytes) -> Frame:
    try:
        frame = decode_frame(body)
    except FrameError:
        raise errors.UpstreamError("The model worker answered /worker_generate with invalid "
                                   "JSON.") from None
    raise_for_frame(frame)
    return frame


class WorkerFrames:
    """The Decoder of a worker stream: frames per read, an ``error_code`` frame raised as
    ours (once the frames before it have been taken), a malformed stream as a 502."""

    def __init__(self) -> None:
        self._frames = FrameDecoder()
        self.failure: errors.APIError | None = None

    def feed(self, data: bytes) -> list[Frame] | None:
        try:
            batch = self._frames.feed(data)
        except FrameError as exc:
            return self._fail(exc.frames, errors.UpstreamError(
                f"The model worker sent a malformed stream: {exc}."))
        if batch is not None:
            for position, frame in enumerate(batch):
                if frame.get("error_code"):
                    return self._fail(batch[:position], frame_error(frame))
        return batch

    def end(self) -> None:
        try:
            self._frames.end()  # frames end with their delimiter: nothing to hand over
        except FrameError as exc:
            raise errors.UpstreamError(f"The model worker sent a malformed stream: {exc}.") \
                from None

    def _fail(self, before: list[Frame], error: errors.APIError) -> list[Frame]:
        if not before:
            raise error
        self.failure = error
        return before


def raise_for_frame(frame: Frame) -> None:
    """Raises the exception for a frame whose ``error_code`` is not 0."""
    if frame.get("error_code", 0):
        raise frame_error(frame)


def frame_error(frame: Frame) -> errors.APIError:
    """Our exception for a frame with an ``error_code``."""
    text = str(frame.get("text") or "The model worker reported an error.")
    try:
        code = int(frame["error_code"])
    except (TypeError, ValueError):
        code = error_codes.INTERNAL_ERROR
    error: errors.APIError
    if code == error_codes.CONTEXT_OVERFLOW:
        error = errors.ContextLengthExceeded(text, "messages")
    elif code == error_codes.INVALID_MODEL:  # its text may list the worker's models
        error = errors.ModelNotFound("The model worker does not serve this model.", "model")
    elif 40000 <= code < 41000 and code != error_codes.INVALID_AUTH_KEY:
        error = errors.InvalidRequest(text)
    elif code in (error_codes.RATE_LIMIT, 42902):
        error = errors.Overloaded(text)
    elif code == error_codes.CUDA_OUT_OF_MEMORY:
        error = errors.WorkerOutOfMemory(text)
    elif code in (error_codes.ENGINE_OVERLOADED, error_codes.CONTROLLER_NO_WORKER):
        error = errors.UpstreamUnavailable(text)
    elif code == error_codes.CONTROLLER_WORKER_TIMEOUT:
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

"""HTTP to OpenAI-compatible servers (vLLM, llama.cpp's server, Ollama, TGI, another
gateway): requests on the shared Session, their errors as ours, and their SSE streams as
upstream streams of ``data:`` payloads.

An upstream's 4xx about the request reaches the client as our 400 with the upstream's
message and ``param``; a refused key, an unknown model name or a 5xx is the gateway's
problem (502/503, and a 5xx or 429 may go to another upstream of the model). A message a
client sees says "the upstream server", never its address: that goes to the logs only
(``APIError.internal``).
"""
from __future__ import annotations

from typing import Any, Callable

import orjson
import requests

from app import errors
from app.upstream.openai_config import OpenAITarget
from app.upstream.session import mapped_errors, post_json
from app.upstream.stream import RawChunks, Timing, UpstreamStream, collect

MAX_BODY = 64 * 1024 * 1024  # a non-stream answer, or one SSE event
ERROR_BODY = 8192  # of an error answer, at most this much is read
PROBE_TIMEOUT = (2.0, 2.0)


class OpenAIClient:
    def __init__(self, session: requests.Session) -> None:
        self._session = session

    def post(self, target: OpenAITarget, path: str, payload: dict[str, Any],
             request_id: str) -> requests.Response:
        """The open response (body unread), its status checked; close it when done."""
        headers = {"X-Request-ID": request_id}
        if target.api_key:
            headers["Authorization"] = f"Bearer {target.api_key}"
        try:
            with mapped_errors(WHAT):
                response = post_json(self._session, target.base_url + path, payload,
                                     (target.connect_timeout, target.read_timeout),
                                     stream=True, headers=headers)
        except errors.APIError as exc:
            raise tagged(exc, target)
        if response.status_code != 200:
            try:
                raise status_error(response, target)
            finally:
                response.close()
        return response

    @staticmethod
    def events(response: requests.Response, target: OpenAITarget) -> UpstreamStream[bytes]:
        """A streamed answer as batches of SSE ``data:`` payloads."""
        return UpstreamStream(response, SseData(WHAT), WHAT)

    @staticmethod
    def read_json(response: requests.Response, target: OpenAITarget,
                  client_gone: Callable[[], bool], tick: float) -> dict[str, Any]:
        """A non-stream answer. While the upstream generates (silent until it is done), the
        client is looked at every ``tick``: one that left closes the request, which makes
        the upstream stop."""
        timing = Timing(tick, first_token=target.read_timeout,
                        between_tokens=target.read_timeout)
        try:
            body = collect(UpstreamStream(response, RawChunks(), WHAT), timing, client_gone,
                           MAX_BODY)
        except errors.APIError as exc:
            raise tagged(exc, target)
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise upstream_error("The upstream server answered with invalid JSON.",
                                 target) from None
        if not isinstance(answer, dict):
            raise upstream_error("The upstream server answered with JSON that is not an "
                                 "object.", target)
        return answer

    def answers(self, target: OpenAITarget) -> bool:
        """For health probes: GET /models answers 200."""
        headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else None
        response = self._session.get(target.base_url + "/models", timeout=PROBE_TIMEOUT,
                                     headers=headers)
        response.close()
        return response.status_code == 200


class SseData:
    """The Decoder of an SSE stream: the ``data:`` payloads each read completed (comments
    and other fields dropped, so a read of keep-alive comments gives an empty list). The
    pieces of an unfinished event are joined once, when it ends; lines may end in CRLF."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._parts: list[bytes] = []  # an unfinished event's pieces
        self._size = 0
        self.failure: errors.APIError | None = None

    def feed(self, data: bytes) -> list[bytes] | None:
        # An event ends at a blank line, which may straddle two reads ("\r\n" + "\r\n").
        probe = (self._parts[-1][-3:] if self._parts else b"") + data
        if probe.replace(b"\r\n", b"\n").find(b"\n\n") < 0:
            self._parts.append(data)
            self._size += len(data)
            if self._size > MAX_BODY:
                raise errors.UpstreamError(f"{self._what.capitalize()} sent an SSE event "
                                           f"over {MAX_BODY} bytes.")
            return None
        if self._parts:
            self._parts.append(data)
            data = b"".join(self._parts)
            self._parts.clear()
        held = b""
        if data.endswith(b"\r"):  # perhaps half of a CRLF: its LF is in the next read
            data, held = data[:-1], b"\r"
        data = data.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        rest = (data if end < 0 else data[end + 2:]) + held
        if rest:
            self._parts.append(rest)
        self._size = len(rest)
        return _payloads(data[:end]) if end >= 0 else None

    def end(self) -> list[bytes] | None:
        """A last event without its blank line counts (some servers end their stream so)."""
        last = b"".join(self._parts).replace(b"\r\n", b"\n").strip(b"\n")
        self._parts.clear()
        return _payloads(last) or None if last else None


def _payloads(events: bytes) -> list[bytes]:
    return [payload for block in events.split(b"\n\n")
            if (payload := _event_data(block)) is not None]


def _event_data(block: bytes) -> bytes | None:
    """The data of one SSE event (its ``data:`` lines joined), or None if it has none."""
    lines = [line[5:].removeprefix(b" ") for line in block.split(b"\n")
             if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(lines)


WHAT = "the upstream server"  # as messages name it: never its address


def tagged(error: errors.APIError, target: OpenAITarget) -> errors.APIError:
    """``error`` with the upstream's address for the logs (a client never sees it)."""
    where = f"upstream {target.base_url}, model {target.model!r}"
    if error.internal is None:
        error.internal = where
    elif target.base_url not in error.internal:
        error.internal = f"{where}: {error.internal}"
    return error


def upstream_error(message: str, target: OpenAITarget,
                   kind: type[errors.APIError] = errors.UpstreamError) -> errors.APIError:
    return tagged(kind(message), target)


def status_error(response: requests.Response, target: OpenAITarget) -> errors.APIError:
    status = response.status_code
    try:
        body = next(response.iter_content(ERROR_BODY), b"")
    except requests.RequestException:
        body = b""
    message, param, code = _explanation(body)
    where = WHAT.capitalize()
    error: errors.APIError
    if status in (400, 422):
        error = errors.InvalidRequest(message or f"{where} refused the request.", param)
        if code == "context_length_exceeded":
            error = errors.ContextLengthExceeded(message, param or "messages")
        return error
    if status == 413:
        return errors.PayloadTooLarge(message or f"{where} found the request too large.")
    detail = f": {message}" if message else "."
    if status in (401, 403):
        error = errors.UpstreamError(f"{where} refused the gateway's credentials (HTTP "
                                     f"{status}); check its api_key_env.")
    elif status == 404:
        error = errors.UpstreamError(f"{where} answered 404 for the model" + detail)
    elif status == 429:
        error = errors.Overloaded(f"{where} is at capacity" + detail)
        retry_after = response.headers.get("Retry-After")
        error.headers = {"Retry-After": retry_after if retry_after and
                         retry_after.isdigit() else "1"}
    elif status in (502, 503):
        error = errors.UpstreamUnavailable(f"{where} is unavailable (HTTP {status})" + detail)
    elif status == 504:
        error = errors.UpstreamTimeout(f"{where} timed out (HTTP 504)" + detail)
    else:
        error = errors.UpstreamError(f"{where} answered with HTTP {status}" + detail)
    error.failover = status >= 500 or status == 429  # the server's trouble, not the request's
    return tagged(error, target)


def _explanation(body: bytes) -> tuple[str, str | None, str | None]:
    """(message, param, code) from an OpenAI envelope, FastChat's or vLLM's error object,
    TGI's {"error": "..."} or plain text; shortened, never the whole body."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return " ".join(body[:300].decode("utf-8", "replace").split()), None, None
    if not isinstance(parsed, dict):
        return "", None, None
    inner = parsed.get("error")
    source = inner if isinstance(inner, dict) else parsed
    message = source.get("message") or (inner if isinstance(inner, str) else "") \
        or parsed.get("detail") or ""
    if not isinstance(message, str):
        message = orjson.dumps(message).decode()
    param = source.get("param")
    code = source.get("code")
    return (" ".join(message.split())[:1000], param if isinstance(param, str) else None,
            code if isinstance(code, str) else None)

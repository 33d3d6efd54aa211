"""Requests for models that OpenAI-compatible upstreams serve: the client's own body goes
on (with the upstream's name for the model), and the answer comes back (with the client's).

Our schemas, limits, auth and admission have run already; what an upstream understands
beyond them (tools, tool_choice, response_format, seed, logprobs...) passes through
untouched. Streams are relayed event by event, with the FastChat path's guarantees: a
failure before the first byte fails over or gets its HTTP status, one after it ends the
stream with an error event and ``[DONE]``, and a client that leaves closes the upstream
request, which makes the upstream stop generating.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import orjson

from app.errors import APIError, ClientClosedRequest
from app.serving.call import Call
from app.serving.events import DONE
from app.serving.queueing import CallQueue
from app.serving.stream_driver import drain
from app.serving.usage import answer_tokens, completion_tokens, prompt_tokens
from app.telemetry import tracing
from app.upstream.clients import Upstream
from app.upstream.failover import releaser, with_failover
from app.upstream.openai_client import OpenAIClient, upstream_error
from app.upstream.openai_config import OpenAITarget
from app.upstream.stream import Timing, UpstreamStream, follow

CHAT = "/chat/completions"
COMPLETIONS = "/completions"
EMBEDDINGS = "/embeddings"


def complete(path: str, payload: dict[str, Any], model: str, upstream: Upstream,
             call: Call, max_tokens: int | None = None, choices: int = 1) -> dict[str, Any]:
    """A non-stream answer (chat, completion or embeddings), ``model`` as the client named
    it; ``max_tokens`` and ``choices`` as the client's request (validated) asks."""
    payload = _admit(path, payload, model, upstream, call, max_tokens, choices)
    client = upstream.openai.client

    def attempt(target: OpenAITarget) -> dict[str, Any]:
        with call.waiting_upstream():
            response = client.post(target, path, _outgoing(payload, target), call.request_id)
            try:
                return client.read_json(response, target, call.client_gone,
                                        upstream.timing.tick)
            except ClientClosedRequest:
                # Closing the request stops the upstream, which says nothing of what it
                # made by then: the request's ceiling is charged.
                call.meter.unseen = path != EMBEDDINGS
                raise

    target, answer = with_failover(upstream.openai, model, attempt, upstream.failures,
                                   queue=_queue(upstream, call), trace=call.trace)
    upstream.openai.release(target)
    if "model" in answer:
        answer["model"] = model
    if path != EMBEDDINGS and not answer.get("service_tier"):
        answer["service_tier"] = call.service_tier  # an upstream that says nothing
    # An upstream that gives no usage is charged what its answer holds (a token per four
    # characters).
    call.meter.report(prompt_tokens(answer),
                      completion_tokens(answer) or answer_tokens(answer))
    call.release_slot(call.meter.prompt() + call.meter.completion())  # done: it goes on
    return answer


def open_stream(path: str, payload: dict[str, Any], model: str, upstream: Upstream,
                call: Call, max_tokens: int | None = None, choices: int = 1
                ) -> tuple[Iterator[bytes | None], list[Callable[[], object]]]:
    """The relayed events and the close callbacks, for ``sse.response``."""
    payload = _admit(path, payload, model, upstream, call, max_tokens, choices)
    client = upstream.openai.client
    # The usage is asked for whether the client wants it or not: it is what the key is
    # charged. A client that did not ask does not get the usage chunk.
    options = payload.get("stream_options")
    asked = isinstance(options, dict) and bool(options.get("include_usage"))
    if path != EMBEDDINGS and not asked:
        payload = {**payload, "stream_options": {**(options if isinstance(options, dict)
                                                    else {}), "include_usage": True}}
    target, response = with_failover(upstream.openai, model, lambda target: client.post(
        target, path, _outgoing(payload, target), call.request_id), upstream.failures,
        queue=_queue(upstream, call), trace=call.trace)
    stream = OpenAIClient.events(response, target)
    timing = Timing(tick=upstream.timing.tick, first_token=target.read_timeout,
                    between_tokens=target.read_timeout)
    events = _relay(stream, target, _Events(model, target, call, hide_usage=not asked),
                    call, timing)
    return events, [stream.close, releaser(upstream.openai, target)]


def _admit(path: str, payload: dict[str, Any], model: str, upstream: Upstream, call: Call,
           max_tokens: int | None, choices: int) -> dict[str, Any]:
    """The key's limits let the request in; the payload to send, with the budget's cap on
    max_tokens when the client set none."""
    if path == EMBEDDINGS:
        call.admit(model, max_tokens=0)  # nothing is generated: the key pays for its inputs
        return payload
    asked = payload.get("service_tier")
    cap = call.admit(model, max_tokens, choices, upstream.context_length(model),
                     asked if isinstance(asked, str) else None)
    if cap is not None:
        payload = {**payload, "max_tokens": cap}
    if asked is not None:  # the upstream hears the tier the key may use, not the asked one
        payload = {**payload, "service_tier": call.service_tier}
    return payload


def _queue(upstream: Upstream, call: Call) -> CallQueue[OpenAITarget]:
    """The line for an upstream server's slots, where its entry gives max_concurrency."""
    return CallQueue(upstream.slots, call, lambda target: (target.server,
                                                           target.max_concurrency))


def _outgoing(payload: dict[str, Any], target: OpenAITarget) -> dict[str, Any]:
    if payload.get("model") == target.model:
        return payload
    return {**payload, "model": target.model}


def _relay(stream: UpstreamStream[bytes], target: OpenAITarget, events: "_Events",
           call: Call, timing: Timing) -> Iterator[bytes | None]:
    items = follow(stream, timing, call.client_gone)
    done = False
    span = call.trace.open("stream") if call.trace is not None else None
    ended, broke = "client left", None
    try:
        for batch in items:
            if batch is None:
                yield None  # nothing yet: the upstream queues or reads the prompt
                continue
            out = []
            for data in batch:
                if data == b"[DONE]":
                    done = True
                    call.release_slot(call.meter.prompt() + call.meter.completion())
                    break
                try:
                    relayed = events.relayed(data)
                    if relayed:
                        out.append(relayed)
                except APIError:
                    if out:  # what came before the failure is the client's
                        yield b"".join(out)
                    raise
            if out:
                yield b"".join(out)
            if done:
                break
        if not done and not events.finished:
            raise upstream_error("The upstream server ended the stream before it was "
                                 "complete.", target)
        ended = "done"
        yield DONE
        if done:
            drain(items)
    except APIError as exc:
        ended, broke = "upstream broke off", exc.message
        raise
    finally:
        stream.close()
        if span is not None:
            tracing.end_stream(span, call, ended, broke,
                               {"gen_ai.usage.output_tokens": call.meter.completion()})


class _Events:
    """Turns an upstream's event data into our ``data:`` events: the client's model name,
    one line each, errors as ours; notes the first token and the usage on ``call``. Where
    no usage comes (an upstream that ignores ``include_usage``, or a stream cut short),
    the completion tokens are counted as they pass: one per event that carries output
    (what vLLM, llama.cpp's server and Ollama send per token)."""

    def __init__(self, model: str, target: OpenAITarget, call: Call,
                 hide_usage: bool = False) -> None:
        self._model = model
        self._hide_usage = hide_usage  # the client did not ask for the usage chunk
        self._as_sent = b'"model":' + orjson.dumps(model)  # compact JSON needs no rewrite
        self._target = target
        self._call = call
        self.finished = False  # a choice has had its finish_reason

    def relayed(self, data: bytes) -> bytes:
        # find, not "in": on bytes, "in" raises and clears an error before it searches.
        call = self._call
        fast = not (call.first_token_at is None or data.find(b"\n") >= 0
                    or data.find(self._as_sent) < 0 or data.find(b'"completion_tokens"') >= 0
                    or data.find(b'"error"') >= 0)
        if not fast:
            data = self._checked(data)  # counts its own output
            if not data:
                return b""
        if data.find(b'"finish_reason":"') >= 0 or data.find(b'"finish_reason": "') >= 0:
            self.finished = True
        elif fast:
            call.meter.counted += 1  # mid-stream, not a finish: a chunk of output
        return b"data: " + data + b"\n\n"

    def _checked(self, data: bytes) -> bytes:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise upstream_error("The upstream server sent an event that is not JSON.",
                                 self._target) from None
        if not isinstance(event, dict):
            raise upstream_error("The upstream server sent an event that is not a JSON "
                                 "object.", self._target)
        if "error" in event or event.get("object") == "error":
            error = event.get("error")
            message = (error.get("message") if isinstance(error, dict) else error) \
                or event.get("message") or "unknown error"
            raise upstream_error("The upstream server failed: "
                                 f"{' '.join(str(message).split())[:1000]}", self._target)
        outputs = _outputs(event)
        if outputs:
            self._call.meter.counted += outputs
            if self._call.first_token_at is None:
                self._call.first_token()
        tokens = completion_tokens(event)
        if tokens:
            self._call.meter.report(prompt_tokens(event), tokens)
        if self._hide_usage and event.get("usage"):
            if not event.get("choices"):
                return b""  # the usage chunk the client did not ask for
            event["usage"] = None
            return orjson.dumps({**event, "model": self._model})
        if event.get("model", self._model) != self._model or data.find(b"\n") >= 0:
            event["model"] = self._model
            return orjson.dumps(event)
        return data


def _outputs(event: dict[str, Any]) -> int:
    """How many of the event's choices carry output."""
    found = 0
    for choice in event.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls")
                                        or delta.get("reasoning_content")):
            found += 1
        elif choice.get("text"):
            found += 1
    return found

"""Turns worker frames into SSE chunk bytes, for chat and text completions (and the
Responses API's events) alike.

The endpoint decides what a chunk looks like (a ChunkFormat); this module decides when
chunks go out: deltas as text becomes releasable, one finish chunk per choice as soon as
that choice ends, the usage chunk, then the format's closing (``[DONE]``). Everything
that one upstream read produced goes out as one write, and a tick of the workers' silence
passes on as None (the SSE response's cue for a keep-alive). Errors end the stream
through ``app.web.sse``'s guard (error event, then ``[DONE]``); a client that goes away
ends it at once, which closes the worker streams and so cancels their generations.
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol, Sequence

from app.errors import APIError
from app.protocol.frames import Frame
from app.protocol.stop_strings import TextTracker, finish_reason
from app.serving.call import Call
from app.serving.usage import UsageTally
from app.serving.worker_streams import WorkerStreams
from app.telemetry import tracing


class ChunkFormat(Protocol):
    closing: bytes  # what ends the stream: [DONE] for chat and text completions

    def opening(self, index: int) -> bytes: ...
    def delta(self, index: int, text: str, frame: Frame) -> bytes: ...
    def tool_calls(self, index: int, deltas: list[dict[str, Any]]) -> bytes: ...
    def finish(self, index: int, reason: str) -> bytes: ...
    def usage(self, usage: dict[str, int]) -> bytes: ...


def drive(source: WorkerStreams, fmt: ChunkFormat, trackers: Sequence[TextTracker],
          usage: UsageTally, call: Call, include_usage: bool) -> Iterator[bytes | None]:
    """The whole event stream, with the usage chunk if ``include_usage``. ``call`` learns
    when the first text went out and, when the stream ends however it ends (a client
    that leaves early included), the tokens the workers counted so far."""
    done = [False] * len(trackers)
    remaining = len(trackers)
    calls_sent: list[list[int]] = [[] for _ in trackers]  # arguments sent, per call
    items = source.items()
    span = call.trace.open("stream") if call.trace is not None else None
    ended = "client left"  # unless it ends otherwise: the client closed it meanwhile
    broke: str | None = None
    try:
        opening = b"".join(fmt.opening(i) for i in range(len(trackers)))
        if opening:
            yield opening
        for batch in items:
            if batch is None:
                yield None  # nothing arrived for a tick
                continue
            out = []
            for index, frames in batch:
                if done[index]:
                    continue  # read on to the end, so the connection can be reused
                text, reason, frame = _advance(trackers[index], frames, usage, index)
                deltas = _call_deltas(frame, calls_sent[index]) if "tool_calls" in frame \
                    else None
                if text:
                    out.append(fmt.delta(index, text, frame))
                if deltas:
                    out.append(fmt.tool_calls(index, deltas))
                if (text or deltas) and call.first_token_at is None:
                    call.first_token()
                if reason is not None:
                    out.append(fmt.finish(index, reason))
                    done[index] = True
                    remaining -= 1
                    if trackers[index].stopped:
                        source.finish(index)  # cut by a stop string: cancel the generation
            if out:
                yield out[0] if len(out) == 1 else b"".join(out)
            if not remaining:
                totals = usage.total()  # the workers are done: their slot goes on at once
                call.release_slot(totals["prompt_tokens"] + totals["completion_tokens"])
                ended = "done"
                yield (fmt.usage(totals) if include_usage else b"") + fmt.closing
                drain(items)
                return
        yield fmt.closing  # unreachable: every choice ends before its source does
    except APIError as exc:
        ended, broke = "upstream broke off", exc.message
        raise
    finally:
        items.close()
        source.close()
        totals = usage.total()
        call.meter.report(totals["prompt_tokens"], totals["completion_tokens"])
        if span is not None:
            tracing.end_stream(span, call, ended, broke, {
                "flaskchat.choices": len(trackers),
                "gen_ai.usage.output_tokens": totals["completion_tokens"]})


def _advance(tracker: TextTracker, frames: list[Frame] | None, usage: UsageTally,
             index: int) -> tuple[str, str | None, Frame]:
    """The text one read releases, the finish reason if the choice ended, and its frame."""
    if frames is None:  # the stream ended without a finish_reason
        return tracker.flush(), "stop", {}
    # Text is cumulative: only the last frame of a read matters, unless one before it
    # already finished the choice.
    frame = next((f for f in frames if f.get("finish_reason")), frames[-1])
    usage.record(index, frame)
    reason = finish_reason(frame)
    text = tracker.feed(frame.get("text") or "", final=reason is not None)
    return text, "stop" if tracker.stopped else reason, frame


def tool_calls_of(frame: Frame) -> list[dict[str, Any]]:
    """The well-formed tool calls of a worker's frame (OpenAI's shape, arguments a
    string), up to the first that is not."""
    calls = frame.get("tool_calls")
    good: list[dict[str, Any]] = []
    for found in calls if isinstance(calls, list) else []:
        function = found.get("function") if isinstance(found, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or \
                not isinstance(function.get("arguments"), str) or \
                not isinstance(found.get("id"), str):
            break  # not a call: nothing from here on can be trusted to line up
        good.append({"id": found["id"], "type": "function",
                     "function": {"name": function["name"],
                                  "arguments": function["arguments"]}})
    return good


def _call_deltas(frame: Frame, sent: list[int]) -> list[dict[str, Any]]:
    """What is new in a frame's tool calls (flaskchat's worker sends them all each time, as
    it does the text), as OpenAI's tool_calls deltas: a new call with its id and name, then
    the pieces of its arguments. ``sent``: the length of each call's arguments sent."""
    deltas: list[dict[str, Any]] = []
    for position, found in enumerate(tool_calls_of(frame)):
        function = found["function"]
        arguments: str = function["arguments"]
        if position == len(sent):
            deltas.append({"index": position, "id": found["id"], "type": "function",
                           "function": {"name": function["name"],
                                        "arguments": arguments}})
            sent.append(len(arguments))
        elif len(arguments) > sent[position]:
            deltas.append({"index": position,
                           "function": {"arguments": arguments[sent[position]:]}})
            sent[position] = len(arguments)
    return deltas


def drain(items: Iterator[Any]) -> None:
    """Reads what is left after the stream's end (usually just the end of the chunked
    body), so the upstream connection returns to the pool. The client already has all it
    asked for: a failure here is no longer its concern."""
    try:
        for _ in items:
            pass
    except APIError:
        pass

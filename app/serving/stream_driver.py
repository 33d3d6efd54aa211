"""Turns worker frames into SSE chunk bytes, for chat and text completions alike.

The endpoint decides what a chunk looks like (a ChunkFormat); this module decides when
chunks go out: deltas as text becomes releasable, one finish chunk per choice as soon as
that choice ends, the usage chunk, then ``[DONE]``. Everything that one upstream read
produced goes out as one write. Errors raised by the source end a stream through
``app.web.sse``'s guard (error event, then ``[DONE]``); a client that goes away ends it at once,
which closes the worker streams and so cancels their generations.
"""
from __future__ import annotations

import time
from typing import Any, Iterator, Protocol, Sequence, Union

from app.web import sse
from app.serving.call import Call
from app.errors import APIError
from app.serving.sources import MergedSource, SingleSource
from app.serving.generation import UsageTally, completion_tokens
from app.protocol.stop_strings import TextTracker, finish_reason

Source = Union[SingleSource, MergedSource]


class ChunkFormat(Protocol):
    def opening(self, index: int) -> bytes: ...
    def delta(self, index: int, text: str, frame: dict[str, Any]) -> bytes: ...
    def finish(self, index: int, reason: str) -> bytes: ...
    def usage(self, usage: dict[str, int]) -> bytes: ...


def drive(source: Source, fmt: ChunkFormat, trackers: Sequence[TextTracker],
          usage: UsageTally | None, call: Call, keepalive: float) -> Iterator[bytes]:
    """The whole event stream. ``usage`` is None unless the client asked for it; ``call``
    learns when the first text went out and how many tokens were generated."""
    done = [False] * len(trackers)
    remaining = len(trackers)
    items = iter(source)
    written = time.monotonic()
    try:
        opening = b"".join(fmt.opening(i) for i in range(len(trackers)))
        if opening:
            yield opening
        for index, batch in items:
            if index < 0:  # TICK: nothing arrived for a while
                if call.client_gone():
                    return  # the finally below cancels the generations
                if time.monotonic() - written >= keepalive:
                    written = time.monotonic()
                    yield sse.KEEPALIVE
                continue
            if done[index]:
                continue  # read on to the end, so the connection can be reused
            text, reason, frame = _advance(trackers[index], batch, usage, index)
            out = fmt.delta(index, text, frame) if text else b""
            if text and call.first_token_at is None:
                call.first_token()
            if reason is not None:
                call.completion_tokens += completion_tokens(frame)
                out += fmt.finish(index, reason)
                done[index] = True
                remaining -= 1
                if trackers[index].stopped:
                    source.finish(index)  # cut by a stop string: cancel the generation
            if out:
                written = time.monotonic()
                yield out
            if not remaining:
                yield (fmt.usage(usage.total()) if usage is not None else b"") + sse.DONE
                drain(items)
                return
        yield sse.DONE  # unreachable: every choice ends before its source does
    finally:
        _close(items, source)


def _advance(tracker: TextTracker, batch: list[dict[str, Any]] | None,
             usage: UsageTally | None, index: int) -> tuple[str, str | None, dict[str, Any]]:
    """The text one read releases, the finish reason if the choice ended, and its frame."""
    if batch is None:  # the stream ended without a finish_reason
        return tracker.flush(), "stop", {}
    # Text is cumulative: only the last frame of a read matters, unless one before it
    # already finished the choice.
    frame = next((f for f in batch if f.get("finish_reason")), batch[-1])
    if usage is not None:
        usage.record(index, frame)
    reason = finish_reason(frame)
    text = tracker.feed(frame.get("text") or "", final=reason is not None)
    return text, "stop" if tracker.stopped else reason, frame


def drain(items: Iterator[Any]) -> None:
    """Reads what is left after the stream's end (usually just the end of the chunked
    body), so the upstream connection returns to the pool. The client already has all it
    asked for: a failure here is no longer its concern."""
    try:
        for _ in items:
            pass
    except APIError:
        pass


def _close(items: Iterator[Any], source: Source) -> None:
    close = getattr(items, "close", None)
    if close is not None:
        close()
    source.close()

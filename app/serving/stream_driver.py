"""Turns worker frames into SSE chunk bytes, for chat and text completions alike.

The endpoint decides what a chunk looks like (a ChunkFormat); this module decides when
chunks go out: deltas as text becomes releasable, one finish chunk per choice as soon as
that choice ends, the usage chunk, then ``[DONE]``. Everything that a single upstream read
produced goes out as one write. Errors raised by the source end the stream through
``app.sse``'s guard (error event, then ``[DONE]``).
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol, Sequence, Union

from app import sse
from app.errors import APIError
from app.serving.frame_sources import MergedSource, SingleSource
from app.serving.generation import UsageTally
from app.text_stream import TextTracker, finish_reason

Source = Union[SingleSource, MergedSource]


class ChunkFormat(Protocol):
    def opening(self, index: int) -> bytes: ...
    def delta(self, index: int, text: str, frame: dict[str, Any]) -> bytes: ...
    def finish(self, index: int, reason: str) -> bytes: ...
    def usage(self, usage: dict[str, int]) -> bytes: ...


def drive(source: Source, fmt: ChunkFormat, trackers: Sequence[TextTracker],
          usage: UsageTally | None) -> Iterator[bytes]:
    """The whole event stream. ``usage`` is None unless the client asked for it."""
    done = [False] * len(trackers)
    remaining = len(trackers)
    items = iter(source)
    try:
        opening = b"".join(fmt.opening(i) for i in range(len(trackers)))
        if opening:
            yield opening
        for index, batch in items:
            if index < 0:  # KEEPALIVE
                yield sse.KEEPALIVE
                continue
            if done[index]:
                continue  # read on to the end, so the connection can be reused
            out, reason = _step(trackers[index], fmt, index, batch, usage)
            if reason is not None:
                out += fmt.finish(index, reason)
                done[index] = True
                remaining -= 1
                if trackers[index].stopped:
                    source.finish(index)  # cut by a stop string: cancel the generation
            if out:
                yield out
            if not remaining:
                yield (fmt.usage(usage.total()) if usage is not None else b"") + sse.DONE
                _drain(items)
                return
        yield sse.DONE  # unreachable: every choice ends before its source does
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()
        source.close()


def _drain(items: Iterator[Any]) -> None:
    """Reads what is left after the last choice ended (usually just the end of the chunked
    body), so the worker connection returns to the pool. The client already has [DONE]:
    a failure here is no longer its concern."""
    try:
        for _ in items:
            pass
    except APIError:
        pass


def _step(tracker: TextTracker, fmt: ChunkFormat, index: int,
          batch: list[dict[str, Any]] | None, usage: UsageTally | None) -> tuple[bytes, str | None]:
    """The bytes for one read of one choice, and its finish reason if it ended."""
    if batch is None:  # the stream ended without a finish_reason
        text = tracker.flush()
        return (fmt.delta(index, text, {}) if text else b""), "stop"
    # Text is cumulative: only the last frame of a read matters, unless one before it
    # already finished the choice.
    frame = next((f for f in batch if f.get("finish_reason")), batch[-1])
    if usage is not None:
        usage.record(index, frame)
    reason = finish_reason(frame)
    text = tracker.feed(frame.get("text") or "", final=reason is not None)
    if tracker.stopped:
        reason = "stop"
    return (fmt.delta(index, text, frame) if text else b""), reason

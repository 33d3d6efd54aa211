"""Turns worker frames into SSE chunk bytes, for chat and text completions alike.

The endpoint decides what a chunk looks like (a ChunkFormat); this module decides when
chunks go out: deltas as text becomes releasable, one finish chunk per choice as soon as
that choice ends, the usage chunk, then ``[DONE]``. Errors raised by the source end the
stream through ``app.sse``'s guard (error event, then ``[DONE]``).
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol, Sequence, Union

from app import sse
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
        for index, frame in items:
            if index < 0:  # KEEPALIVE
                yield sse.KEEPALIVE
                continue
            if done[index]:
                continue
            tracker = trackers[index]
            reason: str | None
            if frame is None:  # the stream ended without a finish_reason
                text, reason = tracker.flush(), "stop"
            else:
                if usage is not None:
                    usage.record(index, frame)
                reason = finish_reason(frame)
                text = tracker.feed(frame.get("text") or "", final=reason is not None)
                if tracker.stopped:
                    reason = "stop"
            if text:
                yield fmt.delta(index, text, frame or {})
            if reason is None:
                continue
            yield fmt.finish(index, reason)
            done[index] = True
            remaining -= 1
            source.finish(index)
            if not remaining:
                break
        if usage is not None:
            yield fmt.usage(usage.total())
        yield sse.DONE
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()
        source.close()

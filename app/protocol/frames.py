"""The worker protocol's stream codec: JSON objects, each followed by one NUL byte."""
from __future__ import annotations

from typing import Any

import orjson

DELIMITER = b"\0"
MAX_FRAME_BYTES = 64 * 1024 * 1024
TAIL = 320  # bytes after a frame's text that hold its error_code and finish_reason

Frame = dict[str, Any]


class FrameError(ValueError):
    """The stream broke the protocol: bad JSON, a truncated tail, an oversized frame.
    ``frames`` are the good ones the same chunk completed before the bad one."""

    def __init__(self, message: str, frames: list[Frame] | None = None) -> None:
        super().__init__(message)
        self.frames = frames or []


def encode_frame(frame: Frame) -> bytes:
    # JSON escapes U+0000 inside strings and UTF-8 never makes a 0x00 byte otherwise,
    # so the delimiter cannot occur inside a frame.
    return orjson.dumps(frame) + DELIMITER


def decode_frame(data: bytes) -> Frame:
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"invalid JSON frame: {exc}") from None
    if not isinstance(frame, dict):
        raise FrameError("a frame must be a JSON object")
    return frame


class FrameDecoder:
    """Frames from body chunks split anywhere; one chunk may hold several frames.

    ``feed`` gives the frames a chunk completed: a list (empty when the chunk held only
    bare delimiters, which flaskchat's worker sends as keep-alive probes), or None when it
    completed nothing. The pieces of an unfinished frame are joined once, when its
    delimiter arrives, so a frame that spans many reads costs its size, not its square.

    With ``skip_superseded``, a plain-text frame followed by another in the same chunk is
    not decoded (the text is cumulative: the later one says all it said) unless the frame
    after it is an error or a finish; under load that is most of the parsing saved.
    """

    def __init__(self, max_frame: int = MAX_FRAME_BYTES, skip_superseded: bool = True) -> None:
        self._max_frame = max_frame
        self._skip = skip_superseded
        self._parts: list[bytes] = []  # an unfinished frame's pieces
        self._size = 0

    def feed(self, chunk: bytes) -> list[Frame] | None:
        if chunk.find(DELIMITER) < 0:  # not "in": that raises and clears an error first
            if chunk:
                self._parts.append(chunk)
                self._size += len(chunk)
                if self._size > self._max_frame:
                    raise FrameError(f"a frame is larger than {self._max_frame} bytes")
            return None
        if self._parts:
            self._parts.append(chunk)
            chunk = b"".join(self._parts)
            self._parts.clear()
        *complete, rest = chunk.split(DELIMITER)
        if rest:
            self._parts.append(rest)
        self._size = len(rest)
        return self._decode([data for data in complete if data])

    def end(self) -> None:
        """At the end of the stream: nothing may be left half-sent."""
        if b"".join(self._parts).strip():
            raise FrameError("the stream ended in the middle of a frame")

    def _decode(self, pieces: list[bytes]) -> list[Frame]:
        batch: list[Frame] = []
        skipped = b""  # the latest routine frame not decoded yet
        last = len(pieces) - 1
        for position, data in enumerate(pieces):
            if self._skip and position < last and _routine(data):
                skipped = data  # superseded, unless what follows is not plain text
                continue
            try:
                if skipped:
                    batch.append(decode_frame(skipped))
                    skipped = b""
                batch.append(decode_frame(data))
            except FrameError as exc:
                raise FrameError(str(exc), batch) from None
        return batch


def _routine(data: bytes) -> bool:
    """A frame that only carries text: it says ``"finish_reason": null`` (error frames have
    no finish_reason at all; a final frame has a reason). When a later frame arrived in the
    same read, its cumulative text supersedes this one, which then need not be decoded.
    Anything else (an error, a finish, something odd) is decoded and checked."""
    if data[:1] != b"{" or data[-1:] != b"}":
        return False
    # JSON escapes quotes inside strings, so the key cannot be faked by the text; workers
    # put it after the (long, cumulative) text, so only the tail is searched.
    start = max(0, len(data) - TAIL)
    return data.find(b'"finish_reason":null', start) >= 0 or \
        data.find(b'"finish_reason": null', start) >= 0

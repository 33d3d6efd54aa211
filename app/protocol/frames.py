"""The worker protocol's stream codec: JSON objects, each followed by one NUL byte."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import orjson

DELIMITER = b"\0"
MAX_FRAME_BYTES = 64 * 1024 * 1024
TAIL = 320  # bytes after a frame's text that hold its error_code and finish_reason


class FrameError(ValueError):
    """The stream broke the protocol: bad JSON, a truncated tail, an oversized frame."""


def encode_frame(frame: dict[str, Any]) -> bytes:
    # JSON escapes U+0000 inside strings and UTF-8 never makes a 0x00 byte otherwise,
    # so the delimiter cannot occur inside a frame.
    return orjson.dumps(frame) + DELIMITER


def decode_frame(data: bytes) -> dict[str, Any]:
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"invalid JSON frame: {exc}") from None
    if not isinstance(frame, dict):
        raise FrameError("a frame must be a JSON object")
    return frame


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


def iter_frames(chunks: Iterable[bytes],
                max_frame: int = MAX_FRAME_BYTES) -> Iterator[dict[str, Any]]:
    """Frames from raw body chunks split anywhere; one chunk may hold several frames."""
    for batch in iter_frame_batches(chunks, max_frame, skip_superseded=False):
        yield from batch


def iter_frame_batches(chunks: Iterable[bytes], max_frame: int = MAX_FRAME_BYTES,
                       skip_superseded: bool = True) -> Iterator[list[dict[str, Any]]]:
    """The frames completed by each chunk, as one list per chunk that completed a frame or
    a bare delimiter (an empty list: the stream is alive, nothing to show).

    With ``skip_superseded``, a plain-text frame followed by another frame in the same
    chunk is left out (cumulative text: the later one says all it said), unless the frame
    after it is an error or a finish; that is most of the parsing saved under load."""
    buffer = b""
    for chunk in chunks:
        if not chunk:
            continue
        buffer = buffer + chunk if buffer else chunk
        if DELIMITER not in chunk:
            if len(buffer) > max_frame:
                raise FrameError(f"a frame is larger than {max_frame} bytes")
            continue
        *complete, buffer = buffer.split(DELIMITER)
        pieces = [data for data in complete if data]
        if not pieces:
            yield []  # only NUL probes (flaskchat's worker sends them while queued)
            continue
        batch: list[dict[str, Any]] = []
        skipped = b""  # the latest routine frame not decoded yet
        last = len(pieces) - 1
        for position, data in enumerate(pieces):
            if skip_superseded and position < last and _routine(data):
                skipped = data  # superseded, unless what follows is not plain text
                continue
            try:
                if skipped:
                    batch.append(decode_frame(skipped))
                    skipped = b""
                batch.append(decode_frame(data))
            except FrameError:
                if batch:  # the good frames before a bad one still count
                    yield batch
                raise
        yield batch
    if buffer.strip():
        raise FrameError("the stream ended in the middle of a frame")

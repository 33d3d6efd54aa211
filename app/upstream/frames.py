"""The worker protocol's stream codec: JSON objects, each followed by one NUL byte."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import orjson

DELIMITER = b"\0"
MAX_FRAME_BYTES = 64 * 1024 * 1024


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


def iter_frames(chunks: Iterable[bytes],
                max_frame: int = MAX_FRAME_BYTES) -> Iterator[dict[str, Any]]:
    """Frames from raw body chunks split anywhere; one chunk may hold several frames."""
    for batch in iter_frame_batches(chunks, max_frame):
        yield from batch


def iter_frame_batches(chunks: Iterable[bytes],
                       max_frame: int = MAX_FRAME_BYTES) -> Iterator[list[dict[str, Any]]]:
    """The frames completed by each chunk, as one list per chunk that completed any."""
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
        batch = []
        for data in complete:
            if not data:
                continue
            try:
                batch.append(decode_frame(data))
            except FrameError:
                if batch:  # the good frames before a bad one still count
                    yield batch
                raise
        if batch:
            yield batch
    if buffer.strip():
        raise FrameError("the stream ended in the middle of a frame")

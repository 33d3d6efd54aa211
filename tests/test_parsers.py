"""Property tests for the pure parsers: NUL frames, cumulative-text deltas, SSE framing."""
from __future__ import annotations

from typing import Any, Iterator

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from app.web import sse
from app.errors import UpstreamError
from app.protocol.stop_strings import TextTracker, cut_at_stop
from app.protocol.frames import FrameError, encode_frame, iter_frame_batches, iter_frames

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3), max_leaves=8)
frames = st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4), max_size=6)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points + [len(data)]:
        pieces.append(data[last:point])
        last = point
    return pieces


@given(frames, st.lists(st.integers(0, 10_000), max_size=12))
def test_frames_survive_any_split(items: list[dict[str, Any]], cuts: list[int]) -> None:
    data = b"".join(encode_frame(item) for item in items)
    assert list(iter_frames(split_at(data, cuts))) == items


@given(st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b and b.strip()))
def test_truncated_tail_is_an_error(tail: bytes) -> None:
    with pytest.raises(FrameError):
        list(iter_frames([encode_frame({"text": "a"}), tail]))


@pytest.mark.parametrize("data", [b"{not json\0", b"[1,2]\0", b"\xff\xfe\0", b'{"a":1}{"b":2}\0'])
def test_bad_frames_are_errors(data: bytes) -> None:
    with pytest.raises(FrameError):
        list(iter_frames([data]))


def test_oversized_frame_is_an_error() -> None:
    with pytest.raises(FrameError):
        list(iter_frames([b"x" * 600, b"y" * 600], max_frame=1000))


def test_empty_pieces_between_delimiters_are_skipped() -> None:
    assert list(iter_frames([b"\0\0" + encode_frame({"a": 1}) + b"\0"])) == [{"a": 1}]


def test_worker_error_frames_raise_mapped_errors() -> None:
    from app.upstream.worker import raise_for_frame
    with pytest.raises(UpstreamError):
        raise_for_frame({"text": "boom", "error_code": 50001})
    raise_for_frame({"text": "fine", "error_code": 0})


# ---- cumulative text -> deltas --------------------------------------------------------

texts = st.text(alphabet="ab<|>x\ufffd é", max_size=30)


@given(texts, st.lists(st.text(alphabet="ab<|>", min_size=1, max_size=4), max_size=3),
       st.lists(st.integers(0, 40), max_size=8))
@settings(max_examples=300)
def test_deltas_add_up_and_never_show_a_stop(reply: str, stops: list[str],
                                             cuts: list[int]) -> None:
    tracker = TextTracker(stops)
    points = sorted({c % (len(reply) + 1) for c in cuts}) + [len(reply)]
    released = ""
    for point in points:
        released += tracker.feed(reply[:point], final=point == len(reply))
        if tracker.stopped:
            break
    expected, stopped = cut_at_stop(reply.rstrip("\ufffd"), stops)
    assert released == expected
    assert tracker.stopped == stopped
    for stop in stops:
        assert stop not in released


def test_partial_stop_is_held_then_released() -> None:
    tracker = TextTracker(["STOP"])
    assert tracker.feed("Hello ST") == "Hello "
    assert tracker.feed("Hello STA") == "STA"
    assert tracker.feed("Hello STAY ST") == "Y "
    assert tracker.feed("Hello STAY STOP and more") == ""
    assert tracker.stopped


def test_incomplete_character_is_held() -> None:
    tracker = TextTracker()
    assert tracker.feed("h\ufffd") == "h"
    assert tracker.feed("hé") == "é"


def test_echo_floor_ignores_stops_in_the_prompt() -> None:
    tracker = TextTracker(["###"], floor=len("Q ### A:"))
    assert tracker.feed("Q ### A: yes ###", final=True) == "Q ### A: yes "


# ---- SSE framing ------------------------------------------------------------------------

def decode_sse(chunks: Iterator[bytes]) -> list[str]:
    return [event.data for event in SSEDecoder().iter_bytes(chunks)]


@given(st.text(), st.lists(st.integers(0, 500), max_size=6))
def test_sse_payloads_survive_the_client_decoder(text: str, cuts: list[int]) -> None:
    payload = {"content": text + "\u2028\u0085\r\n\r"}
    data = sse.event(payload) + sse.KEEPALIVE + sse.DONE
    events = decode_sse(iter(split_at(data, cuts)))
    assert orjson.loads(events[0]) == payload
    assert events[-1] == "[DONE]"


def worker_frame(text: str, finish: str | None = None, code: int = 0) -> dict[str, Any]:
    return {"text": text, "error_code": code, "usage": {"completion_tokens": len(text)},
            "finish_reason": finish}


@given(st.lists(st.text(max_size=4), min_size=1, max_size=12), st.booleans(),
       st.lists(st.integers(0, 5_000), max_size=10))
def test_skipping_superseded_frames_keeps_what_matters(pieces: list[str], fails: bool,
                                                       cuts: list[int]) -> None:
    """Batches are cut anywhere; each batch still ends with the newest frame, the
    finishing or failing frame is always there, and so is the text frame before a failure."""
    texts = ["".join(pieces[:i + 1]) for i in range(len(pieces))]
    frames = [worker_frame(t) for t in texts[:-1]]
    frames.append(worker_frame("boom", code=50001) if fails else
                  worker_frame(texts[-1], finish="stop"))
    data = b"".join(encode_frame(f) for f in frames)
    delivered: list[dict[str, Any]] = []
    for batch in iter_frame_batches(split_at(data, cuts)):
        delivered.extend(batch)
    assert delivered[-1] == frames[-1]
    assert all(frame in frames for frame in delivered)
    if fails and len(frames) > 1:
        assert delivered[-2] == frames[-2]


def test_single_source_without_wait_readable_reads_the_first_frames_in_a_thread() -> None:
    """Responses from another transport (https, urllib3) lack wait_readable."""
    import io

    import requests

    from app.serving.sources import TICK, SingleSource
    from app.upstream.worker import Timing

    response = requests.Response()
    response.raw = io.BytesIO(b"\0" + encode_frame({"text": "a", "error_code": 0}) +
                              encode_frame({"text": "ab", "finish_reason": "stop"}))
    timing = Timing(tick=5, first_token=10, between_tokens=10)
    items = [item for item in SingleSource(response, timing) if item != TICK]
    assert [frame["text"] for _, batch in items if batch for frame in batch][-1] == "ab"
    assert items[-1] == (0, None) and items.count((0, None)) == 1

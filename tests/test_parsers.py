"""Property tests for the pure parsers: NUL frames, cumulative-text deltas, SSE framing
and decoding, and the loop that waits on upstreams."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from app.errors import ClientClosedRequest, UpstreamError, UpstreamTimeout
from app.protocol.frames import FrameDecoder, FrameError, encode_frame
from app.protocol.stop_strings import TextTracker, cut_at_stop
from app.serving.events import DONE, event
from app.upstream.openai_client import SseData
from app.upstream.stream import Timing, follow
from app.upstream.worker import WorkerFrames
from app.web.sse import KEEPALIVE

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3), max_leaves=8)
frames = st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4), max_size=6)


def frames_of(chunks: list[bytes], max_frame: int = 64 * 1024 * 1024) -> list[dict[str, Any]]:
    decoder = FrameDecoder(max_frame, skip_superseded=False)
    out = [frame for chunk in chunks for frame in decoder.feed(chunk) or ()]
    decoder.end()
    return out


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
    assert frames_of(split_at(data, cuts)) == items


@given(st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b and b.strip()))
def test_truncated_tail_is_an_error(tail: bytes) -> None:
    with pytest.raises(FrameError):
        frames_of([encode_frame({"text": "a"}), tail])


@pytest.mark.parametrize("data", [b"{not json\0", b"[1,2]\0", b"\xff\xfe\0", b'{"a":1}{"b":2}\0'])
def test_bad_frames_are_errors(data: bytes) -> None:
    with pytest.raises(FrameError):
        frames_of([data])


def test_oversized_frame_is_an_error() -> None:
    with pytest.raises(FrameError):
        frames_of([b"x" * 600, b"y" * 600], max_frame=1000)


def test_empty_pieces_between_delimiters_are_skipped() -> None:
    assert frames_of([b"\0\0" + encode_frame({"a": 1}) + b"\0"]) == [{"a": 1}]


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
    data = event(payload) + KEEPALIVE + DONE
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
    decoder = FrameDecoder()
    for chunk in split_at(data, cuts):
        delivered.extend(decoder.feed(chunk) or ())
    assert delivered[-1] == frames[-1]
    assert all(frame in frames for frame in delivered)
    if fails and len(frames) > 1:
        assert delivered[-2] == frames[-2]


def test_a_worker_error_frame_comes_after_the_frames_before_it() -> None:
    decoder = WorkerFrames()
    batch = decoder.feed(encode_frame(worker_frame("a")) + encode_frame(worker_frame("ab"))
                         + encode_frame(worker_frame("boom", code=50001)))
    assert batch is not None and [frame["text"] for frame in batch][-1] == "ab"
    assert isinstance(decoder.failure, UpstreamError)
    with pytest.raises(UpstreamError):  # nothing good before it: raised at once
        WorkerFrames().feed(encode_frame(worker_frame("boom", code=50001)))


# ---- SSE decoding (an OpenAI-compatible upstream's stream) ------------------------------

payloads = st.lists(st.text(alphabet=st.characters(codec="utf-8",  # no lone surrogates
                                                   blacklist_characters="\r\n"),
                            max_size=20).map(lambda text: orjson.dumps({"t": text})),
                    min_size=1, max_size=6)


@given(payloads, st.booleans(), st.lists(st.integers(0, 2_000), max_size=10))
def test_sse_data_survives_any_split_and_either_line_ending(
        items: list[bytes], crlf: bool, cuts: list[int]) -> None:
    newline = b"\r\n" if crlf else b"\n"
    wire = b"".join(b": ping" + newline + newline + b"data: " + item + newline + newline
                    for item in items)
    decoder = SseData("test")
    got = [data for chunk in split_at(wire, cuts) for data in decoder.feed(chunk) or ()]
    assert got + (decoder.end() or []) == items


def test_sse_last_event_without_blank_line_counts() -> None:
    decoder = SseData("test")
    assert decoder.feed(b'data: {"a":1}\n\ndata: [DONE]\n') == [b'{"a":1}']
    assert decoder.end() == [b"[DONE]"]


def _cpu(run: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.thread_time()
        run()
        best = min(best, time.thread_time() - started)
    return best


@pytest.mark.parametrize("make,wire", [
    (lambda: FrameDecoder(), lambda size: b'{"text":"' + b"x" * size + b'"}\0'),
    (lambda: SseData("test"), lambda size: b"data: " + b"x" * size + b"\n\n")],
    ids=["frames", "sse"])
def test_one_item_over_many_reads_costs_linear_time(make: Callable[[], Any],
                                                    wire: Callable[[int], bytes]) -> None:
    """A frame or event that arrives in many reads is joined once (issue 12's quadratic
    buffer += data): 64x the bytes cost about 64x the CPU, never the 4096x of a square.
    (A ratio of two sizes on the same machine, so it holds on a slow or busy one; the wide
    spread leaves room for cache effects.)"""
    def run(size: int) -> Callable[[], None]:
        data = wire(size)
        pieces = [data[i:i + 65536] for i in range(0, len(data), 65536)]

        def feed() -> None:
            decoder = make()
            assert sum(len(item) for piece in pieces for item in decoder.feed(piece) or ())
        return feed
    ratio = _cpu(run(16 * 1024 * 1024)) / _cpu(run(256 * 1024))
    assert ratio < 512, f"64x the bytes cost {ratio:.0f}x the CPU"


# ---- follow: the one loop that waits on upstreams ---------------------------------------

class Script:
    """A Readable that delivers scripted batches: a batch after a pause of so many seconds
    (``None`` for the end)."""

    what = "the scripted upstream"

    def __init__(self, steps: list[tuple[float, list[str] | None]]) -> None:
        self.steps = steps
        self.started = time.monotonic()
        self.due = 0.0
        self.closed = False
        self.read_timeout: float | None = None

    def wait(self, timeout: float) -> bool:
        if not self.steps:
            return True
        due = self.due + self.steps[0][0]
        left = due - (time.monotonic() - self.started)
        if left > timeout:
            time.sleep(timeout)
            return False
        time.sleep(max(left, 0))
        return True

    def batches(self) -> Iterator[list[str]]:
        while self.steps:
            pause, batch = self.steps.pop(0)
            self.due += pause
            if batch is None:
                return
            yield batch

    def set_read_timeout(self, seconds: float) -> None:
        self.read_timeout = seconds

    def close(self) -> None:
        self.closed = True


TIMING = Timing(tick=0.05, first_token=1.0, between_tokens=7.0)


def test_follow_ticks_until_the_first_batch_and_skips_probes() -> None:
    script = Script([(0.12, []), (0.0, ["a"]), (0.0, ["b"]), (0.0, []), (0.0, None)])
    items = list(follow(script, TIMING))
    assert items[-2:] == [["a"], ["b"]] and None in items
    assert set(map(str, items[:-2])) == {"None"}  # the probe before "a" was a tick
    assert script.read_timeout == 7.0  # after the first batch, reads wait between_tokens


def test_follow_gives_up_on_a_silent_upstream() -> None:
    script = Script([(5.0, ["late"])])
    with pytest.raises(UpstreamTimeout, match="The scripted upstream sent no token within 1 s"):
        list(follow(script, TIMING))
    assert script.closed


def test_follow_notices_a_client_that_left() -> None:
    gone = iter([False, False, True])
    with pytest.raises(ClientClosedRequest):
        list(follow(Script([(5.0, ["late"])]), TIMING, lambda: next(gone)))

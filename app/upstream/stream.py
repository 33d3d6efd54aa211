"""The upstream stream object, and ``follow``: the one loop that waits on an upstream.

An UpstreamStream is an open upstream answer read as batches of decoded items: the frames
one read brought from a FastChat worker, the SSE data payloads from an OpenAI-compatible
server, or plain body bytes. It is the same over http and https, and the serving layer
never sees requests' objects: it asks the stream to wait, to hand over batches, to give
later reads another timeout, and to close (which makes the upstream stop generating).

``follow`` waits on anything with those four methods, while keeping an eye on the client:
it is how streams, relayed streams and non-stream answers all wait.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, Protocol, TypeVar

import requests

from app.errors import APIError, ClientClosedRequest, UpstreamError, UpstreamTimeout
from app.upstream.connection import Body
from app.upstream.session import mapped_errors

T = TypeVar("T")
MAX_BODY = 64 * 1024 * 1024  # a non-stream answer read with ``collect``


@dataclass(frozen=True)
class Timing:
    """How long an upstream may keep a request waiting."""

    tick: float  # how often a silent upstream reports in to its reader
    first_token: float  # the longest wait for the first batch (queueing and prompt included)
    between_tokens: float  # the longest wait for any later read


class Decoder(Protocol[T]):
    """Turns body bytes into items. ``feed`` gives the items a chunk completed (None for
    none); to hand over good items before an error, it returns them and sets ``failure``,
    which is raised once they have been taken. ``end`` gives what the end of the body
    completed, or raises if it came too early."""

    failure: APIError | None

    def feed(self, data: bytes) -> list[T] | None: ...
    def end(self) -> list[T] | None: ...


class Readable(Protocol[T]):
    what: str

    def wait(self, timeout: float) -> bool: ...
    def batches(self) -> Iterator[list[T]]: ...
    def set_read_timeout(self, seconds: float) -> None: ...
    def close(self) -> None: ...


class UpstreamStream(Generic[T]):
    """An open upstream answer, its status already checked; close it when done.
    ``what`` names the upstream in error messages ("the model worker")."""

    def __init__(self, response: requests.Response, decoder: Decoder[T], what: str) -> None:
        self._response = response
        self._body: Body = response.raw
        self._chunks = self._body.stream()
        self._decoder = decoder
        self.what = what
        self._ready: list[T] | None = None  # a batch that wait() found
        self._ended = False

    def wait(self, timeout: float) -> bool:
        """Whether a batch (or the end) can be taken without waiting, after waiting at
        most ``timeout`` seconds for one read."""
        if self._ready is not None or self._ended:
            return True
        with mapped_errors(self.what):
            if not self._body.wait(timeout):
                return False
            chunk = next(self._chunks, None)
        if chunk is None:
            self._ended = True
            return True
        self._ready = self._decoder.feed(chunk)
        return self._ready is not None

    def batches(self) -> Iterator[list[T]]:
        """Every batch, as reads complete them; each read may wait the read timeout. A
        batch that ``wait`` found meanwhile is the next one, whenever it was found."""
        decoder = self._decoder
        with mapped_errors(self.what):  # once, not per read: it costs a generator each time
            while True:
                if self._ready is not None:
                    batch, self._ready = self._ready, None
                    yield batch
                    self._raise_failure()
                    continue
                if self._ended:
                    break
                chunk = next(self._chunks, None)
                if chunk is None:
                    self._ended = True
                else:
                    self._ready = decoder.feed(chunk)
        last = decoder.end()
        if last is not None:
            yield last

    def _raise_failure(self) -> None:
        failure = self._decoder.failure
        if failure is not None:
            self._decoder.failure = None
            raise failure

    def set_read_timeout(self, seconds: float) -> None:
        self._body.set_timeout(seconds)

    def close(self) -> None:
        self._response.close()


class RawChunks:
    """The Decoder for answers read whole: every read is one item."""

    failure: APIError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        return [data]

    def end(self) -> None:
        return None


def follow(stream: Readable[T], timing: Timing,
           client_gone: Callable[[], bool] | None = None,
           watch_throughout: bool = False) -> Iterator[list[T] | None]:
    """The stream's non-empty batches as they arrive, and None for a tick that brought
    none before the first (so that a caller can send keep-alives).

    Until the first batch, each wait lasts a tick, and all of them ``timing.first_token``
    (then UpstreamTimeout); empty batches (a worker's NUL probes, an SSE comment) show the
    upstream is alive but do not end that wait. After it, each read may wait
    ``timing.between_tokens``. ``client_gone`` is asked at most once a tick, before and
    after the first batch; a client that left raises ClientClosedRequest, and closing the
    stream (the caller's ``finally``) makes the upstream stop. After the first batch it is
    asked when a read brings something, or, ``watch_throughout``, every tick however long
    the upstream is silent (an answer whose bytes may pause for long: a non-stream one).
    """
    clock = time.monotonic
    deadline = clock() + timing.first_token
    asked = clock()
    items = stream.batches()
    while True:
        if stream.wait(timing.tick):
            batch = next(items, None)
            if batch is None:
                return
            if batch:
                break
        now = clock()
        if now > deadline:
            stream.close()
            raise UpstreamTimeout(f"{_sentence(stream.what)} sent no token within "
                                  f"{timing.first_token:g} s.")
        if client_gone is not None and now - asked >= timing.tick:
            asked = now
            if client_gone():
                raise ClientClosedRequest("The client closed the connection.")
        yield None
    stream.set_read_timeout(timing.between_tokens)
    yield batch
    if watch_throughout and client_gone is not None:
        yield from _watched(stream, items, timing, client_gone)
        return
    for batch in items:
        if client_gone is not None:
            now = clock()
            if now - asked >= timing.tick:
                asked = now
                if client_gone():
                    raise ClientClosedRequest("The client closed the connection.")
        if batch:
            yield batch


def _watched(stream: Readable[T], items: Iterator[list[T]], timing: Timing,
             client_gone: Callable[[], bool]) -> Iterator[list[T]]:
    """``follow`` after the first batch, looking at the client every tick."""
    clock = time.monotonic
    deadline = clock() + timing.between_tokens
    asked = clock()
    while True:
        if stream.wait(timing.tick):
            batch = next(items, None)
            if batch is None:
                return
            deadline = clock() + timing.between_tokens
            if batch:
                yield batch
        elif clock() > deadline:
            stream.close()
            raise UpstreamTimeout(f"{_sentence(stream.what)} went silent for "
                                  f"{timing.between_tokens:g} s.")
        if clock() - asked >= timing.tick:
            asked = clock()
            if client_gone():
                raise ClientClosedRequest("The client closed the connection.")


def collect(stream: UpstreamStream[bytes], timing: Timing, client_gone: Callable[[], bool],
            limit: int = MAX_BODY) -> bytes:
    """A whole answer, waited for with ``follow`` (so a client that leaves meanwhile
    closes the request), at most ``limit`` bytes; the stream is closed afterwards."""
    body: list[bytes] = []
    size = 0
    try:
        for batch in follow(stream, timing, client_gone, watch_throughout=True):
            for data in batch or ():
                body.append(data)
                size += len(data)
                if size > limit:
                    raise UpstreamError(f"{_sentence(stream.what)} sent an answer over "
                                        f"{limit} bytes.")
    finally:
        stream.close()
    return b"".join(body)


def _sentence(what: str) -> str:
    return what[:1].upper() + what[1:]

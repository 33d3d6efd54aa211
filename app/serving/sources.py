"""Where a request's frames come from: one worker stream, or several interleaved.

Both yield ``(index, frames)``: the frames that arrived together in one read (a worker
that is ahead sends several per read, and only the last one's cumulative text matters),
``(index, None)`` when that stream has ended, and ``TICK`` every ``Timing.tick`` seconds
while nothing arrives, so that the caller can write keepalive comments and notice a client
that went away while a worker queues or reads the prompt.

A stream that gives no first frame within ``Timing.first_token`` fails with
UpstreamTimeout; after it, each read may wait ``Timing.between_tokens``.

``finish(index)`` closes a stream the caller is done with early (a stop string cut it),
which cancels the generation; a stream that ended by itself is read to its end instead,
so that its keep-alive connection goes back to the pool.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Generator, Generic, Iterator, Sequence, TypeVar, Union

import requests

from app.errors import UpstreamTimeout
from app.upstream.worker import Timing, WorkerClient

Frame = dict[str, Any]
Item = tuple[int, Union[list[Frame], None]]
TICK: Item = (-1, None)  # nothing arrived for a tick
B = TypeVar("B")
Opener = Callable[[], requests.Response]


class SingleSource:
    """One already-open worker stream (a single choice: the hot path)."""

    def __init__(self, response: requests.Response, timing: Timing) -> None:
        self._response = response
        self._timing = timing

    def __iter__(self) -> Iterator[Item]:
        batches = WorkerClient.frame_batches(self._response)
        if (yield from until_first_batch(self._response, batches, self._timing, 0)):
            return
        for batch in batches:
            if batch:
                yield 0, batch
        yield 0, None

    def finish(self, index: int) -> None:
        self.close()

    def close(self) -> None:
        self._response.close()


def until_first_batch(response: requests.Response, batches: Iterator[list[B]], timing: Timing,
                      index: int, what: str = "The model worker"
                      ) -> Generator[tuple[int, list[B] | None], None, bool]:
    """Yields TICKs until the first non-empty batch, then that batch; returns whether the
    stream already ended. Each read waits a tick at most, so silence never blocks the
    caller. (Batches are worker frames, or an OpenAI-compatible server's SSE events.)"""
    wait = getattr(response.raw, "wait_readable", None)
    deadline = time.monotonic() + timing.first_token
    first: _FirstBatch[B] | None = None
    while True:
        if time.monotonic() > deadline:
            response.close()
            raise UpstreamTimeout(f"{what} sent no token within {timing.first_token:g} s.")
        if wait is not None:  # our transport: a peek with a timeout, no thread
            if not wait(timing.tick):
                yield -1, None  # TICK
                continue
            batch = next(batches, None)
        else:  # another transport (https): the read happens in a helper thread
            first = first or _FirstBatch(batches)
            if not first.arrived.wait(timing.tick):
                yield -1, None  # TICK
                continue
            batch, first = first.result(), None
        if batch is None:
            yield index, None
            return True
        if batch:
            set_timeout = getattr(response.raw, "set_timeout", None)
            if set_timeout is not None:
                set_timeout(timing.between_tokens)
            yield index, batch
            return False


class _FirstBatch(Generic[B]):
    """Reads the next batch in a helper thread so the caller can wait with a timeout."""

    def __init__(self, batches: Iterator[list[B]]) -> None:
        self.arrived = threading.Event()
        self._batch: list[B] | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._read, args=(batches,), daemon=True).start()

    def _read(self, batches: Iterator[list[B]]) -> None:
        try:
            self._batch = next(batches, None)
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc
        finally:
            self.arrived.set()

    def result(self) -> list[B] | None:
        if self._error is not None:
            raise self._error
        return self._batch


class MergedSource:
    """Several worker streams read concurrently; their frames interleave as they arrive.
    The first is opened by the caller (so its failures can still fail over); the others
    are opened here, each in its own thread."""

    def __init__(self, first: requests.Response, openers: Sequence[Opener],
                 timing: Timing) -> None:
        self._first = first
        self._openers = openers
        self._timing = timing
        self._responses: dict[int, requests.Response] = {0: first}
        self._finished: set[int] = set()
        self._closed = False
        self._queue: queue.Queue[tuple[int, list[Frame] | BaseException | None]] = \
            queue.Queue()

    def __iter__(self) -> Iterator[Item]:
        streams = 1 + len(self._openers)
        self._spawn(0, lambda: self._first)
        for index, opener in enumerate(self._openers, start=1):
            self._spawn(index, opener)
        while streams:
            try:
                index, item = self._queue.get(timeout=self._timing.tick)
            except queue.Empty:
                yield TICK
                continue
            if isinstance(item, BaseException):
                streams -= 1
                if index not in self._finished:
                    raise item
            elif item is None:
                streams -= 1
                yield index, None
            elif index not in self._finished:
                yield index, item

    def _spawn(self, index: int, opener: Opener) -> None:
        threading.Thread(target=self._pump, args=(index, opener), daemon=True).start()

    def _pump(self, index: int, opener: Opener) -> None:
        try:
            response = opener()
            self._responses[index] = response
            if self._closed or index in self._finished:
                response.close()
            batches = WorkerClient.frame_batches(response)
            first = _FirstOnly(response, batches, self._timing)
            for batch in first:
                self._queue.put((index, batch))
            if not first.ended:
                for batch in batches:
                    if batch:
                        self._queue.put((index, batch))
            self._queue.put((index, None))
        except BaseException as exc:  # reported through the queue
            self._queue.put((index, exc))

    def finish(self, index: int) -> None:
        self._finished.add(index)
        response = self._responses.get(index)
        if response is not None:
            response.close()

    def close(self) -> None:
        self._closed = True
        for response in list(self._responses.values()):
            response.close()


class _FirstOnly:
    """The first frame of one of the merged streams, with the first-token deadline; its
    ticks are dropped (the merged source ticks on its own)."""

    def __init__(self, response: requests.Response, batches: Iterator[list[Frame]],
                 timing: Timing) -> None:
        self._items = until_first_batch(response, batches, timing, 0)
        self.ended = False

    def __iter__(self) -> Iterator[list[Frame]]:
        try:
            while True:
                _, batch = next(self._items)
                if batch:
                    yield batch
        except StopIteration as stop:
            self.ended = bool(stop.value)

"""Where a stream's frames come from: one worker stream, or n of them interleaved.

Both yield ``(index, frames)``: the frames that arrived together in one read (a worker
that is ahead sends several per read, and only the last one's cumulative text matters),
``(index, None)`` when that stream has ended, and ``KEEPALIVE`` whenever nothing has
arrived for ``keepalive`` seconds, so that the caller can write an SSE comment while a
worker is still queueing or reading the prompt.

``finish(index)`` closes a stream the caller is done with early (a stop string cut it),
which cancels the generation; a stream that ended by itself is read to its end instead,
so that its keep-alive connection goes back to the pool.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Generator, Iterator, Union

import requests

from app.upstream.worker import WorkerClient

Frame = dict[str, Any]
Item = tuple[int, Union[list[Frame], None]]
KEEPALIVE: Item = (-1, None)  # nothing arrived for a while
Opener = Callable[[], requests.Response]


class SingleSource:
    """One already-open worker stream (n = 1: the hot path, no thread per frame)."""

    def __init__(self, response: requests.Response, keepalive: float) -> None:
        self._response = response
        self._keepalive = keepalive

    def __iter__(self) -> Iterator[Item]:
        batches = WorkerClient.frame_batches(self._response)
        wait = getattr(self._response.raw, "wait_readable", None)
        if wait is None:  # another transport (https): wait for the first read in a thread
            if (yield from self._first_in_thread(batches)):
                return
        else:
            while True:  # until the first frame; each read is awaited with a timeout
                if not wait(self._keepalive):
                    yield KEEPALIVE
                    continue
                batch = next(batches, None)
                if batch is None:
                    yield 0, None
                    return
                if batch:
                    yield 0, batch
                    break
        for batch in batches:
            if batch:
                yield 0, batch
        yield 0, None

    def _first_in_thread(self, batches: Iterator[list[Frame]]
                         ) -> Generator[Item, None, bool]:
        """Yields up to the first frame; returns whether the stream already ended."""
        while True:
            first = _FirstBatch(batches)
            while not first.arrived.wait(self._keepalive):
                yield KEEPALIVE
            batch = first.result()
            if batch is None:
                yield 0, None
                return True
            if batch:
                yield 0, batch
                return False

    def finish(self, index: int) -> None:
        self.close()

    def close(self) -> None:
        self._response.close()


class _FirstBatch:
    """Reads the first frames in a helper thread so the caller can wait with a timeout."""

    def __init__(self, batches: Iterator[list[Frame]]) -> None:
        self.arrived = threading.Event()
        self._batch: list[Frame] | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._read, args=(batches,), daemon=True).start()

    def _read(self, batches: Iterator[list[Frame]]) -> None:
        try:
            self._batch = next(batches, None)
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc
        finally:
            self.arrived.set()

    def result(self) -> list[Frame] | None:
        if self._error is not None:
            raise self._error
        return self._batch


class MergedSource:
    """n worker streams read concurrently; their frames interleave as they arrive."""

    def __init__(self, openers: list[Opener], keepalive: float) -> None:
        self._openers = openers
        self._keepalive = keepalive
        self._responses: dict[int, requests.Response] = {}
        self._finished: set[int] = set()
        self._closed = False
        self._queue: queue.Queue[tuple[int, list[Frame] | BaseException | None]] = \
            queue.Queue()

    def __iter__(self) -> Iterator[Item]:
        for index, opener in enumerate(self._openers):
            threading.Thread(target=self._pump, args=(index, opener), daemon=True).start()
        running = len(self._openers)
        while running:
            try:
                index, item = self._queue.get(timeout=self._keepalive)
            except queue.Empty:
                yield KEEPALIVE
                continue
            if isinstance(item, BaseException):
                running -= 1
                if index not in self._finished:
                    raise item
            elif item is None:
                running -= 1
                yield index, None
            elif index not in self._finished:
                yield index, item

    def _pump(self, index: int, opener: Opener) -> None:
        try:
            response = opener()
            self._responses[index] = response
            if self._closed or index in self._finished:
                response.close()
            for batch in WorkerClient.frame_batches(response):
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

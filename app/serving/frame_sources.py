"""Where a stream's frames come from: one worker stream, or n of them interleaved.

Both yield ``(index, frame)`` pairs, ``(index, None)`` when that stream has ended, and
``KEEPALIVE`` whenever nothing has arrived for ``keepalive`` seconds, so that the caller
can write an SSE comment while a worker is still queueing or reading the prompt.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator, Union

import requests

from app.upstream.worker import WorkerClient

Frame = dict[str, Any]
Item = tuple[int, Union[Frame, None]]
KEEPALIVE: Item = (-1, None)  # nothing arrived for a while
Opener = Callable[[], requests.Response]


class SingleSource:
    """One already-open worker stream (n = 1: the hot path, no thread per frame)."""

    def __init__(self, response: requests.Response, keepalive: float) -> None:
        self._response = response
        self._keepalive = keepalive

    def __iter__(self) -> Iterator[Item]:
        frames = WorkerClient.frames(self._response)
        first = _FirstFrame(frames)
        while not first.arrived.wait(self._keepalive):
            yield KEEPALIVE
        frame = first.result()
        if frame is not None:
            yield 0, frame
            for frame in frames:
                yield 0, frame
        yield 0, None

    def finish(self, index: int) -> None:
        self.close()

    def close(self) -> None:
        self._response.close()


class _FirstFrame:
    """Reads the first frame in a helper thread so the caller can wait with a timeout."""

    def __init__(self, frames: Iterator[Frame]) -> None:
        self.arrived = threading.Event()
        self._frame: Frame | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._read, args=(frames,), daemon=True).start()

    def _read(self, frames: Iterator[Frame]) -> None:
        try:
            self._frame = next(frames, None)
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc
        finally:
            self.arrived.set()

    def result(self) -> Frame | None:
        if self._error is not None:
            raise self._error
        return self._frame


class MergedSource:
    """n worker streams read concurrently; their frames interleave as they arrive."""

    def __init__(self, openers: list[Opener], keepalive: float) -> None:
        self._openers = openers
        self._keepalive = keepalive
        self._responses: dict[int, requests.Response] = {}
        self._finished: set[int] = set()
        self._closed = False
        self._queue: queue.Queue[tuple[int, Frame | BaseException | None]] = queue.Queue()

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
            for frame in WorkerClient.frames(response):
                self._queue.put((index, frame))
            self._queue.put((index, None))
        except BaseException as exc:  # reported through the queue
            self._queue.put((index, exc))

    def finish(self, index: int) -> None:
        """The caller is done with ``index``: stop its generation, ignore what follows."""
        self._finished.add(index)
        response = self._responses.get(index)
        if response is not None:
            response.close()

    def close(self) -> None:
        self._closed = True
        for response in list(self._responses.values()):
            response.close()

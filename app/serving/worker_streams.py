"""The worker streams of one request's choices, read as one.

``items()`` yields, as reads complete them, lists of ``(choice index, frames)`` (a worker
that is ahead sends several frames per read, and only the last one's cumulative text
matters), ``(index, None)`` once that choice's stream has ended, and None for each tick
of silence before the first frame (the SSE response may then send a keep-alive). One
choice, the hot path, is one stream followed in the request's own greenlet; several are
read concurrently, each in a thread of its own (a greenlet under gevent), and interleave
as they arrive.

``finish(index)`` closes a stream the caller is done with early (a stop string cut it),
which cancels that generation; a stream that ended by itself is read to its end instead,
so that its keep-alive connection goes back to the pool.
"""
from __future__ import annotations

import contextvars
import queue
import threading
from typing import Callable, Generator, Iterator, Sequence, Union

from app.protocol.frames import Frame
from app.upstream.stream import Timing, UpstreamStream, follow

Item = tuple[int, Union[list[Frame], None]]
Opener = Callable[[], UpstreamStream[Frame]]


class WorkerStreams:
    def __init__(self, first: UpstreamStream[Frame], openers: Sequence[Opener],
                 timing: Timing, client_gone: Callable[[], bool]) -> None:
        self._first = first
        self._timing = timing
        self._client_gone = client_gone
        self._merged = _Merged(first, openers, timing) if openers else None

    def items(self) -> Generator[list[Item] | None, None, None]:
        if self._merged is not None:
            yield from follow(self._merged, self._timing, self._client_gone)
            return
        for batch in follow(self._first, self._timing, self._client_gone):
            yield None if batch is None else [(0, batch)]
        yield [(0, None)]

    def finish(self, index: int) -> None:
        if self._merged is not None:
            self._merged.finish(index)
        else:
            self._first.close()

    def close(self) -> None:
        if self._merged is not None:
            self._merged.close()
        else:
            self._first.close()


class _Merged:
    """Several worker streams as one Readable: each is followed by its own pump thread
    (which enforces that stream's first-token and between-token limits), and a batch is
    whatever the pumps delivered since the last one."""

    what = "the model workers"

    def __init__(self, first: UpstreamStream[Frame], openers: Sequence[Opener],
                 timing: Timing) -> None:
        self._timing = timing
        self._streams: dict[int, UpstreamStream[Frame]] = {0: first}
        self._finished: set[int] = set()
        self._closed = False
        self._queue: queue.Queue[tuple[int, list[Frame] | BaseException | None]] = \
            queue.Queue()
        self._ready: list[Item] = []
        self._running = 1 + len(openers)
        self._pump(0, lambda: first)
        for index, opener in enumerate(openers, start=1):
            self._pump(index, opener)

    def wait(self, timeout: float) -> bool:
        if self._ready or not self._running:
            return True
        try:
            self._take(self._queue.get(timeout=timeout))
        except queue.Empty:
            return False
        self._take_queued()
        return True

    def batches(self) -> Iterator[list[Item]]:
        while self._running or self._ready:
            if not self._ready:
                self._take(self._queue.get())  # each pump ends: its stream has timeouts
                self._take_queued()
            batch, self._ready = self._ready, []
            yield batch

    def set_read_timeout(self, seconds: float) -> None:
        pass  # each pump sets its own stream's

    def finish(self, index: int) -> None:
        self._finished.add(index)
        stream = self._streams.get(index)
        if stream is not None:
            stream.close()

    def close(self) -> None:
        self._closed = True
        for stream in list(self._streams.values()):
            stream.close()

    def _take_queued(self) -> None:
        while True:
            try:
                self._take(self._queue.get_nowait())
            except queue.Empty:
                return

    def _take(self, entry: tuple[int, list[Frame] | BaseException | None]) -> None:
        index, item = entry
        if isinstance(item, BaseException):
            self._running -= 1
            if index not in self._finished:
                raise item
        elif item is None:
            self._running -= 1
            self._ready.append((index, None))
        elif index not in self._finished:
            self._ready.append((index, item))

    def _pump(self, index: int, opener: Opener) -> None:
        def run() -> None:
            try:
                stream = opener()
                self._streams[index] = stream
                if self._closed or index in self._finished:
                    stream.close()
                for batch in follow(stream, self._timing):  # the client: the caller's job
                    if batch is not None:
                        self._queue.put((index, batch))
                self._queue.put((index, None))
            except BaseException as exc:  # reported through the queue
                self._queue.put((index, exc))
        # In the request's context: its request id in the log, its trace in traceparent
        threading.Thread(target=contextvars.copy_context().run, args=(run,),
                         daemon=True).start()

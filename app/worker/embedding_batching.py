"""Dynamic batching for the embedding worker: ``runners`` threads run the batches.

Request threads tokenize their inputs (the fast tokenizer's batch call) and queue them;
a free runner merges what is waiting, from every request, into batches bounded by inputs
and by padded tokens, each batch's inputs sorted by length so that little is padding,
and hands each request its vectors in its own order. A request's inputs are taken in
turns with the others' (a 2,048-input request does not make a one-line query wait for
all of it). Several runners, each engine call on one core, keep every core busy with
batches of their own (rather than one batch split over the cores, whose threads wait for
the slowest when the gateway shares the machine: bench/RESULTS.md, issue 26). When the
first input arrives alone a runner waits up to ``linger`` for
company (measured: bench/RESULTS.md, issue 26). A request whose client left is dropped
from the queue; a batch that fails is run again one request at a time, so that an input
that fails fails only its own request.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger("flaskchat.worker")

Encode = Callable[[Sequence[Sequence[int]]], np.ndarray]  # token ids -> (n, dim) float32


class Cancelled(Exception):
    """The request's client left before its vectors were ready."""


@dataclass(eq=False)
class Pending:
    """One request: its inputs' token ids, and its vectors as batches finish."""

    ids: Sequence[Sequence[int]]
    cancel: threading.Event
    vectors: np.ndarray | None = None
    queued: deque[int] = field(default_factory=deque)  # input positions not yet taken
    missing: int = 0  # inputs not computed yet
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.queued.extend(range(len(self.ids)))
        self.missing = len(self.ids)


@dataclass(frozen=True)
class Limits:
    # Measured (bench/embedding_speed.py): with a runner per core, batches of 16 keep
    # both busy on one 32-input request, and a lone input gains nothing by waiting.
    max_inputs: int = 16  # per batch
    max_tokens: int = 8192  # per batch, padding included
    linger: float = 0.0  # seconds a lone input waits for others


def plan_batch(waiting: Sequence[Pending], limits: Limits) -> list[tuple[Pending, int]]:
    """The next batch: inputs taken in turns from each waiting request (oldest first),
    sorted by length, cut where ``max_inputs`` or ``max_tokens`` (inputs x the longest)
    would be passed. Takes the inputs it returns off their requests' queues."""
    picked: list[tuple[Pending, int]] = []
    turn = [pending for pending in waiting if pending.queued]
    while turn and len(picked) < limits.max_inputs:
        for pending in list(turn):
            picked.append((pending, pending.queued.popleft()))
            if not pending.queued:
                turn.remove(pending)
            if len(picked) == limits.max_inputs:
                break
    picked.sort(key=lambda item: len(item[0].ids[item[1]]))
    kept = len(picked)
    while kept > 1 and kept * len(picked[kept - 1][0].ids[picked[kept - 1][1]]) > \
            limits.max_tokens:
        kept -= 1
    for pending, position in reversed(picked[kept:]):  # back to the front of their queue
        pending.queued.appendleft(position)
    return picked[:kept]


class EmbeddingBatcher:
    def __init__(self, encode: Encode, dimensions: int, limits: Limits = Limits(),
                 runners: int = 1) -> None:
        self._encode = encode
        self._dimensions = dimensions
        self.limits = limits
        self._waiting: list[Pending] = []
        self._wake = threading.Condition()
        for number in range(max(1, runners)):
            threading.Thread(target=self._loop, name=f"embedding-batcher-{number}",
                             daemon=True).start()

    def embed(self, ids: Sequence[Sequence[int]], cancel: threading.Event) -> np.ndarray:
        """The vectors of ``ids``, in order. Raises Cancelled once ``cancel`` is set (the
        request's inputs leave the queue), or the error its batch failed with."""
        pending = Pending(ids, cancel)
        pending.vectors = np.empty((len(ids), self._dimensions), dtype=np.float32)
        if not ids:
            return pending.vectors
        with self._wake:
            self._waiting.append(pending)
            self._wake.notify()
        while not pending.done.wait(0.25):
            if cancel.is_set():
                with self._wake:
                    self._wake.notify()  # the thread drops it at its next look
                raise Cancelled()
        if pending.error is not None:
            raise pending.error
        return pending.vectors

    # ---- the runners ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                batch = self._next_batch()
                if batch:
                    self._run(batch)
            except BaseException:  # a runner must go on whatever happened
                log.exception("embedding batch failed")

    def _next_batch(self) -> list[tuple[Pending, int]]:
        with self._wake:
            while not self._live():
                self._wake.wait()
            lone = sum(len(p.queued) for p in self._waiting) == 1
            if lone and self.limits.linger > 0:  # company may be on its way
                self._wake.wait(self.limits.linger)
                self._live()
            batch = plan_batch(self._waiting, self.limits)
            if any(p.queued for p in self._waiting):
                self._wake.notify()  # more for a free runner
            return batch

    def _live(self) -> bool:
        """Drops finished and abandoned requests; True if any input waits."""
        for pending in [p for p in self._waiting if p.cancel.is_set() or
                        (not p.queued and p.missing == 0)]:
            self._waiting.remove(pending)
        return any(p.queued for p in self._waiting)

    def _run(self, batch: list[tuple[Pending, int]]) -> None:
        try:
            vectors = self._encode([pending.ids[position] for pending, position in batch])
        except Exception as exc:  # noqa: BLE001 - whose input was it? try each alone
            if len({id(pending) for pending, _ in batch}) > 1:
                for pending in {id(p): p for p, _ in batch}.values():
                    self._run([(p, i) for p, i in batch if p is pending])
                return
            self._fail(batch[0][0], exc)
            return
        with self._wake:  # another runner may be finishing the same request's inputs
            for (pending, position), vector in zip(batch, vectors):
                assert pending.vectors is not None
                pending.vectors[position] = vector
                pending.missing -= 1
                if pending.missing == 0 and pending.error is None:
                    pending.done.set()

    def _fail(self, pending: Pending, exc: BaseException) -> None:
        with self._wake:
            pending.error = exc
            pending.queued.clear()
        pending.done.set()

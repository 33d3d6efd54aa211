"""Continuous batching on the onnx decoder: one scheduler thread runs every generation.

Each iteration it (1) drops generations whose client left, (2) feeds waiting prompts into
their cache rows (after the longest prefix a recent prompt shares: app.worker.prefix_cache),
about PREFILL_BUDGET tokens per iteration in chunks of PREFILL_CHUNK (a long prompt is
spread over several iterations, so the others keep decoding; see _chunk_end for where the
chunks end), and (3) decodes one token for every generation whose prompt is in, as one
batch. A request that arrives while others generate joins at the next iteration, with its
own sampling settings, stop strings and token limit (its Generation). Rows [0, decoding)
decode; the row after them may hold a prompt still being fed in.

Request threads only wait on their own queue of frames.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator

import torch

from app.worker.generation import Generation
from app.worker.onnx_decoder import OnnxDecoder
from app.worker.prefix_cache import PrefixCache
from app.worker.structured.matchers import Constraint, GrammarFailed

log = logging.getLogger("flaskchat.worker")

PREFILL_CHUNK = 128
PREFILL_BUDGET = 256
FINISHED = None


@dataclass(eq=False)
class _Entry:
    generation: Generation
    cancel: threading.Event
    frames: "queue.SimpleQueue[dict[str, Any] | BaseException | None]" = field(
        default_factory=queue.SimpleQueue)
    fed: int = 0  # prompt tokens in the cache so far
    prompt_logits: list[torch.Tensor] = field(default_factory=list)  # only for echo logprobs


class Batcher:
    def __init__(self, decoder: OnnxDecoder, prefixes: PrefixCache) -> None:
        self.decoder = decoder
        self.prefixes = prefixes
        self._waiting: deque[_Entry] = deque()
        self._rows: list[_Entry] = []  # index = cache row; the last may be mid-prompt
        self._decoding = 0
        self._wake = threading.Condition()
        self._masks = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        threading.Thread(target=self._loop, name="batcher", daemon=True).start()

    def generate(self, generation: Generation,
                 cancel: threading.Event) -> Iterator[dict[str, Any]]:
        entry = _Entry(generation, cancel)
        with self._wake:
            self._waiting.append(entry)
            self._wake.notify()
        while True:
            item = entry.frames.get()
            if item is FINISHED or cancel.is_set():
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    # ---- the scheduler thread ----------------------------------------------------------

    def _loop(self) -> None:
        torch.set_num_threads(1)  # sampling is per row and small; the cores are onnx's
        while True:
            with self._wake:
                while not self._rows and not self._waiting:
                    self._wake.wait()
            try:
                self._drop_cancelled()
                self._feed_prompts()
                if self._decoding:
                    self._decode()
            except BaseException as exc:  # a failed step fails every generation in it
                log.exception("batch step failed")  # (the thread itself must go on)
                self._fail_all(exc if isinstance(exc, Exception) else RuntimeError(exc))

    def _drop_cancelled(self) -> None:
        with self._wake:
            for entry in [e for e in self._waiting if e.cancel.is_set()]:
                self._waiting.remove(entry)
                entry.frames.put(FINISHED)
        for row in reversed(range(len(self._rows))):
            if self._rows[row].cancel.is_set():
                self._release(row)

    def _feed_prompts(self) -> None:
        budget = PREFILL_BUDGET
        while budget > 0:
            if len(self._rows) == self._decoding:  # no prompt in progress: start the next
                if len(self._rows) == self.decoder.slots:
                    return
                with self._wake:
                    if not self._waiting:
                        return
                    self._rows.append(self._waiting.popleft())
                self._rows[-1].generation.job.timeline.started = time.time()
                self._reuse_prefix(len(self._rows) - 1)
            row = len(self._rows) - 1
            entry = self._rows[row]
            prompt = entry.generation.job.input_ids
            chunk = prompt[entry.fed:_chunk_end(entry.fed, len(prompt))]
            logits = self.decoder.prefill(row, chunk,
                                          entry.generation.wants_prompt_logprobs)
            if entry.generation.wants_prompt_logprobs:
                self._prompt_scores(entry, logits)
            entry.fed += len(chunk)
            budget -= len(chunk)
            if entry.fed == len(prompt) - 1:
                self.prefixes.add(prompt[:-1], partial(self.decoder.snapshot, row, entry.fed))
            if entry.fed == len(prompt):
                self._decoding += 1
                entry.generation.job.timeline.prompt_done = time.time()
                for decoding in self._rows[:self._decoding]:  # once per new row, not step
                    timeline = decoding.generation.job.timeline
                    timeline.batch_peak = max(timeline.batch_peak, self._decoding)
                self._advance(row, torch.from_numpy(logits[-1]))

    def _reuse_prefix(self, row: int) -> None:
        """Starts the row with the keys and values of the longest stored prompt prefix
        (never the whole prompt: its last token is fed in for the first logits)."""
        generation = self._rows[row].generation
        if generation.wants_prompt_logprobs:
            return
        prompt = generation.job.input_ids
        shared, snapshot = self.prefixes.longest(prompt)
        shared = min(shared, len(prompt) - 1)
        if snapshot is not None and shared > 0:
            self.decoder.restore(row, snapshot, shared)
            self._rows[row].fed = shared
            generation.job.timeline.cached_tokens = shared

    @staticmethod
    def _prompt_scores(entry: _Entry, logits: Any) -> None:
        entry.prompt_logits.append(torch.from_numpy(logits.copy()))
        if entry.fed + len(logits) == len(entry.generation.job.input_ids):
            entry.generation.add_prompt_scores(torch.cat(entry.prompt_logits))
            entry.prompt_logits.clear()

    def _decode(self) -> None:
        tokens = [self._rows[row].generation.last_token for row in range(self._decoding)]
        constraints = [c for c in (self._rows[row].generation.constraint
                                   for row in range(self._decoding)) if c is not None]
        # The grammars' next masks are worked out while onnxruntime computes the scores
        # (both let go of the GIL): structured rows then cost the batch next to nothing.
        masks = self._masks.submit(_prepare_all, constraints) if constraints else None
        logits = torch.from_numpy(self.decoder.decode(tokens))
        if masks is not None:
            masks.result()
        for row in reversed(range(len(tokens))):
            self._advance(row, logits[row])

    def _advance(self, row: int, scores: torch.Tensor) -> None:
        """The row's next token; its frame out, or its final frame and its row freed."""
        entry = self._rows[row]
        try:
            frame = entry.generation.step(scores)
            if entry.generation.finish is not None:
                frame = entry.generation.final_frame()
        except Exception as exc:  # this request's failure alone: the others go on
            if not isinstance(exc, GrammarFailed):
                log.exception("generation step failed")
            entry.frames.put(exc)
            self._release(row)
            return
        if frame is not None:
            entry.frames.put(frame)
        if entry.generation.finish is not None:
            self._release(row)

    def _release(self, row: int) -> None:
        """Frees a row: the last decoding row moves into it, and a prompt in progress
        moves down behind the decoding rows."""
        entry = self._rows[row]
        entry.frames.put(FINISHED)
        if row >= self._decoding:  # the prompt in progress
            self._rows.pop()
            self.decoder.free(row)
            return
        last = self._decoding - 1
        if row != last:
            self.decoder.move(last, row)
            self._rows[row] = self._rows[last]
        self._decoding -= 1
        if len(self._rows) > self._decoding + 1:  # a prompt in progress sat after ``last``
            self.decoder.move(last + 1, last)
            self._rows[last] = self._rows[last + 1]
            self._rows.pop()
        else:
            self._rows.pop()
            self.decoder.free(last)

    def _fail_all(self, exc: Exception) -> None:
        for row in range(len(self._rows)):
            self._rows[row].frames.put(exc)
            self.decoder.free(row)
        self._rows.clear()
        self._decoding = 0


def _prepare_all(constraints: list[Constraint]) -> None:
    for constraint in constraints:
        constraint.prepare()  # never raises: a failure stays with its row


def _chunk_end(fed: int, length: int) -> int:
    """Where the chunk of a prompt that starts at ``fed`` ends: at the next multiple of
    PREFILL_CHUNK, and the last token always alone. The same prompt (after the same cached
    prefix) is then computed the same way whatever else is running, and a repeat of it
    reuses everything but that last token: greedy replies repeat exactly."""
    if fed >= length - 1:
        return length
    return min(length - 1, (fed // PREFILL_CHUNK + 1) * PREFILL_CHUNK)

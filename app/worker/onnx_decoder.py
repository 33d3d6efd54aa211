"""The exported decoder on onnxruntime, with its key-value cache: one row per batch slot.

The graph's GroupQueryAttention reads each row's own length from the attention mask, so
rows of different lengths decode in one batch, each writing its new key and value at its
own position. The cache is one buffer per layer, [slots, kv_heads, max_length, head_dim],
bound as both the past input and the present output (the kernel then updates it in place:
nothing is copied per step). Rows [0, n) are the ones decoding; a batch of n is a view of
the first n rows, so freeing a slot moves the last row into it.

The buffers are anonymous memory without transparent huge pages: pages are touched only as
rows grow, so RSS follows use. (numpy asks for huge pages on large arrays; then the first
token of a new row faults in 2 MiB per layer and head: ~100 ms for SmolLM2's 60 buffers.)
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from app.worker.onnx_export import POSITIONS

PAST = "past_key_values."


class OnnxDecoder:
    def __init__(self, folder: Path, slots: int, max_length: int, head_dim: int,
                 threads: int = 0) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(folder / "model.onnx"), options,
                                                    providers=["CPUExecutionProvider"])
        self.slots = slots
        self.max_length = max_length
        self._caches: list[tuple[str, str, np.ndarray[Any, Any]]] = []
        for spec in self.session.get_inputs():
            if spec.name.startswith(PAST):
                kv_heads = int(spec.shape[1])
                buffer = _zeros((slots, kv_heads, max_length, head_dim))
                self._caches.append((spec.name, "present." + spec.name[len(PAST):], buffer))
        self.lengths = np.zeros(slots, np.int64)  # tokens cached in each row
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        vocabulary = int(logits.shape[-1])
        self._logits = np.empty((slots, 1, vocabulary), np.float32)  # decode's, reused
        self._first = np.zeros(1, np.int64)

    def prefill(self, row: int, tokens: list[int],
                every_position: bool = False) -> np.ndarray[Any, Any]:
        """Appends ``tokens`` to the row's cache; the logits of the last position, or of
        every position, [1 or S, vocab]."""
        total = int(self.lengths[row]) + len(tokens)
        positions = np.arange(len(tokens)) if every_position else np.array([len(tokens) - 1])
        logits = self._run(np.array([tokens], np.int64), np.ones((1, total), np.int64),
                           positions, row, row + 1)
        self.lengths[row] = total
        first: np.ndarray[Any, Any] = logits[0]
        return first

    def decode(self, tokens: list[int]) -> np.ndarray[Any, Any]:
        """One token for each of rows [0, len(tokens)); their next-token logits, [n, vocab]."""
        count = len(tokens)
        lengths = self.lengths[:count]
        width = int(lengths.max()) + 1
        mask = (np.arange(width) <= lengths[:, None]).astype(np.int64)
        logits = self._run(np.array(tokens, np.int64)[:, None], mask, self._first, 0, count,
                           self._logits[:count])
        lengths += 1
        return logits[:, -1]

    def move(self, source: int, target: int) -> None:
        """Row ``source``'s cache into row ``target`` (which is freed)."""
        length = int(self.lengths[source])
        for _, _, buffer in self._caches:
            buffer[target, :, :length] = buffer[source, :, :length]
        self.lengths[target] = length
        self.lengths[source] = 0

    def snapshot(self, row: int, length: int) -> list[np.ndarray[Any, Any]]:
        """A copy of the row's first ``length`` keys and values."""
        return [buffer[row, :, :length].copy() for _, _, buffer in self._caches]

    def restore(self, row: int, snapshot: list[np.ndarray[Any, Any]], length: int) -> None:
        """The row starts with a snapshot's first ``length`` tokens."""
        for (_, _, buffer), part in zip(self._caches, snapshot):
            buffer[row, :, :length] = part[:, :length]
        self.lengths[row] = length

    def free(self, row: int) -> None:
        self.lengths[row] = 0

    def _run(self, ids: np.ndarray[Any, Any], mask: np.ndarray[Any, Any],
             positions: np.ndarray[Any, Any], first: int, end: int,
             into: np.ndarray[Any, Any] | None = None) -> np.ndarray[Any, Any]:
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input(POSITIONS, positions)
        for past, present, buffer in self._caches:
            rows = buffer[first:end]
            shape, address = list(rows.shape), rows.ctypes.data
            binding.bind_input(past, "cpu", 0, np.float32, shape, address)
            binding.bind_output(present, "cpu", 0, np.float32, shape, address)
        if into is not None:
            binding.bind_output("logits", "cpu", 0, np.float32, list(into.shape),
                                into.ctypes.data)
            self.session.run_with_iobinding(binding)
            return into
        binding.bind_output("logits")
        self.session.run_with_iobinding(binding)
        logits: np.ndarray[Any, Any] = binding.get_outputs()[-1].numpy()
        return logits


def _zeros(shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    """float32 zeros in fresh anonymous pages, with no transparent huge pages."""
    size = int(np.prod(shape)) * 4
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, np.float32).reshape(shape)

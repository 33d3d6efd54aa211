"""The embedding worker's dynamic batching: which inputs go together (pure logic), and the
batching thread with a stand-in encoder (no model, no sockets)."""
from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np
import pytest

from app.worker.embedding_batching import (Cancelled, EmbeddingBatcher, Limits, Pending,
                                           plan_batch)
from tests.conftest import wait_for


def pending(*lengths: int) -> Pending:
    return Pending([[7] * length for length in lengths], threading.Event())


def test_requests_take_turns_and_a_batch_is_sorted_by_length() -> None:
    big, small = pending(*([5] * 10)), pending(3, 9)
    batch = plan_batch([big, small], Limits(max_inputs=6, max_tokens=10_000))
    assert [(p is small, len(p.ids[i])) for p, i in batch] == [
        (True, 3), (False, 5), (False, 5), (False, 5), (False, 5), (True, 9)]
    assert list(big.queued) == [4, 5, 6, 7, 8, 9] and not small.queued


def test_padded_tokens_cut_the_batch_and_the_rest_waits_its_turn() -> None:
    """A batch costs inputs x its longest input; what does not fit goes back to the
    front of its request's queue, in order."""
    request = pending(10, 100, 20, 30)
    batch = plan_batch([request], Limits(max_inputs=64, max_tokens=100))
    assert [len(request.ids[i]) for _, i in batch] == [10, 20, 30]
    assert list(request.queued) == [1]
    alone = plan_batch([request], Limits(max_inputs=64, max_tokens=100))
    assert [i for _, i in alone] == [1]  # one input always goes, however long


def encoder(calls: list[int]) -> Any:
    def encode(ids: Sequence[Sequence[int]]) -> np.ndarray:
        calls.append(len(ids))
        if any(13 in row for row in ids):
            raise ValueError("input 13 cannot be encoded")
        return np.array([[float(row[0]), float(len(row))] for row in ids], dtype=np.float32)
    return encode


def test_concurrent_requests_are_batched_and_each_gets_its_own_vectors() -> None:
    calls: list[int] = []
    batcher = EmbeddingBatcher(encoder(calls), 2, Limits(max_inputs=64, linger=0.05))
    results: dict[int, np.ndarray] = {}

    def request(number: int) -> None:
        ids = [[number * 100 + k] * (1 + (k * 7 + number) % 5) for k in range(number + 1)]
        results[number] = batcher.embed(ids, threading.Event())
    threads = [threading.Thread(target=request, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for number, vectors in results.items():
        assert vectors.tolist() == [[number * 100 + k, 1 + (k * 7 + number) % 5]
                                    for k in range(number + 1)]
    assert len(results) == 8 and sum(calls) == 36 and len(calls) < 8  # merged batches


def test_a_failing_input_fails_only_its_request() -> None:
    calls: list[int] = []
    batcher = EmbeddingBatcher(encoder(calls), 2, Limits(linger=0.05))
    results: dict[str, Any] = {}

    def request(name: str, ids: list[list[int]]) -> None:
        try:
            results[name] = batcher.embed(ids, threading.Event())
        except ValueError as exc:
            results[name] = exc
    threads = [threading.Thread(target=request, args=("bad", [[1], [13], [2]])),
               threading.Thread(target=request, args=("good", [[4], [5, 5]]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert isinstance(results["bad"], ValueError)
    assert results["good"].tolist() == [[4, 1], [5, 2]]


def test_a_request_whose_client_left_leaves_the_queue() -> None:
    release = threading.Event()
    seen: list[list[int]] = []

    def slow(ids: Sequence[Sequence[int]]) -> np.ndarray:
        seen.extend(list(row) for row in ids)
        release.wait(30)
        return np.zeros((len(ids), 2), dtype=np.float32)
    batcher = EmbeddingBatcher(slow, 2, Limits(max_inputs=1, linger=0))
    busy = threading.Thread(target=batcher.embed, args=([[1]], threading.Event()))
    busy.start()
    wait_for(lambda: seen == [[1]], what="the first batch to start")
    cancel = threading.Event()
    failures: list[BaseException] = []

    def leaving() -> None:
        try:
            batcher.embed([[2], [3]], cancel)
        except Cancelled as exc:
            failures.append(exc)
    thread = threading.Thread(target=leaving)
    thread.start()
    cancel.set()
    thread.join(30)
    release.set()
    busy.join(30)
    assert failures and seen == [[1]]  # its inputs never reached the model
    assert batcher.embed([[4]], threading.Event()).shape == (1, 2)


@pytest.mark.parametrize("count", [0, 2048])
def test_empty_and_large_requests(count: int) -> None:
    calls: list[int] = []
    batcher = EmbeddingBatcher(encoder(calls), 2, Limits(max_inputs=64, linger=0))
    vectors = batcher.embed([[k % 1000 + 20] for k in range(count)], threading.Event())
    assert vectors.shape == (count, 2)
    assert vectors[:, 0].tolist() == [k % 1000 + 20 for k in range(count)]
    assert all(size <= 64 for size in calls) and sum(calls) == count


def test_two_runners_share_one_large_request_and_keep_its_order() -> None:
    """With a runner per core, a request larger than a batch is run by both at once (each
    encode call waits at a barrier that only two concurrent calls pass), and its vectors
    come back in the request's order whichever runner finished which batch."""
    together = threading.Barrier(2, timeout=30)

    def encode(ids: Sequence[Sequence[int]]) -> np.ndarray:
        together.wait()  # raises BrokenBarrierError (the request fails) if run alone
        return np.array([[float(row[0]), float(len(row))] for row in ids], dtype=np.float32)
    batcher = EmbeddingBatcher(encode, 2, Limits(max_inputs=4, linger=0), runners=2)
    ids = [[n] * (1 + n % 5) for n in range(16)]  # four batches of four
    vectors = batcher.embed(ids, threading.Event())
    assert vectors[:, 0].tolist() == list(range(16))
    assert vectors[:, 1].tolist() == [1 + n % 5 for n in range(16)]

"""The embedding worker's speed on all-MiniLM-L6-v2 (`flaskchat up`'s embedding model), for
each engine, in one run:

    python bench/embedding_speed.py [--seconds 4] [--skip-gateway] [--lingers 0 1 2 5]

1. The model directly (in process: tokenizer, dynamic batcher, engine, pooling), one
   client sending one sentence or 32 at a time, 8 clients of one sentence and 4 of 32;
   for PyTorch, the onnx engine in float32 (its export made with the quality gate set out
   of reach, in a cache folder of its own) and the default onnx engine (8-bit weights).
2. Through the gateway as `flaskchat up` runs it (our controller, the worker with its
   default --limit-worker-concurrency, `flaskchat serve`), for the same three:
   /v1/embeddings with 1 and 8 clients sending one sentence per request, and 1 and 4
   clients sending 32; sentences/s, and a one-sentence request's latency (p50) with one
   client.
3. The batcher's linger (how long a lone input waits for company) at 8 clients of one
   sentence, and its inputs per batch at most, in process.
4. Quality: the smallest cosine between each engine's vectors and PyTorch's on the probe
   set of tests/test_embedding_worker.py.

Not a test: numbers depend on the machine. Run it on an idle one.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import start_controller, start_gateway  # noqa: E402
from tests.test_embedding_worker import PROBES, cosines  # noqa: E402
from tests.test_worker import start_worker  # noqa: E402
from app.worker import loading  # noqa: E402

MODEL = "all-minilm-l6-v2"
# where the float32 export (the quality gate set out of reach) is made, beside the default
FLOAT32_CACHE = loading.cache_dir() / "bench" / "embedding-float32"
QUERIES = [f"How do I {verb} my {thing} on the {place} system?"
           for verb in ("reset", "change", "recover", "update", "delete", "export")
           for thing in ("password", "profile", "invoice", "backup", "account")
           for place in ("intranet", "billing", "mail")]


def rate(clients: int, per_request: int, seconds: float,
         call: Callable[[list[str]], Any]) -> tuple[float, list[float]]:
    """(sentences/s over the wall time, each request's latency) for ``clients`` threads
    calling in a loop for ``seconds``."""
    stop = time.monotonic() + seconds
    done = [0] * clients
    latencies: list[float] = []

    def client(index: int) -> None:
        turn = index * 7
        while time.monotonic() < stop:
            texts = [QUERIES[(turn + k) % len(QUERIES)] for k in range(per_request)]
            turn += per_request
            started = time.monotonic()
            call(texts)
            latencies.append(time.monotonic() - started)
            done[index] += per_request
    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - started), latencies


# (row, --engine, the cache folder the worker reads its export from: None for the default)
VARIANTS = [("transformers (PyTorch float32)", "transformers", None),
            ("onnx float32", "onnx", FLOAT32_CACHE),
            ("onnx, 8-bit weights (the default)", "onnx", None)]


@contextlib.contextmanager
def cache(folder: Path | None) -> Iterator[None]:
    """FLASKCHAT_CACHE_DIR pointed at ``folder`` (for this process and the workers it
    starts), so that the onnx engine loads the export made there."""
    before = os.environ.get("FLASKCHAT_CACHE_DIR")
    if folder is not None:
        os.environ["FLASKCHAT_CACHE_DIR"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FLASKCHAT_CACHE_DIR", None)
        else:
            os.environ["FLASKCHAT_CACHE_DIR"] = before


def direct(seconds: float, lingers: list[float], batch_sizes: list[int]) -> None:
    from app.config import WorkerSettings
    from app.worker import embedding_engines
    from app.worker.embedding_batching import Limits
    from app.worker.embedding_model import EmbeddingModel

    source = loading.resolve(MODEL)
    models = {}
    for name, engine, folder in VARIANTS:
        gate = embedding_engines.QUALITY_GATE
        if folder is not None:  # an export that keeps float32: the gate set out of reach
            embedding_engines.QUALITY_GATE = 2.0
        with cache(folder):
            loaded, tokenizer, config = embedding_engines.load_engine(
                source, WorkerSettings(engine=engine))
        embedding_engines.QUALITY_GATE = gate
        models[name] = EmbeddingModel(loaded, tokenizer, source.folder, config)
        models[name].embed(QUERIES[:32])  # warm
    reference = models[VARIANTS[0][0]].embed(PROBES)[0]
    print("| in process | 1 client x 1 | 1 client x 32 | 8 clients x 1 | 4 clients x 32 | "
          "min cosine to PyTorch |")
    print("|---|---|---|---|---|---|")
    for engine, model in models.items():
        cells = [rate(clients, size, seconds, model.embed)[0]
                 for clients, size in ((1, 1), (1, 32), (8, 1), (4, 32))]
        quality = cosines(model.embed(PROBES)[0], reference).min()
        print(f"| {engine} | " + " | ".join(f"{c:.0f}" for c in cells) + f" | {quality:.5f} |")
    print("\n| linger (ms) | 8 clients x 1 sentences/s | p50 latency (ms) |")
    print("|---|---|---|")
    onnx = models[VARIANTS[-1][0]]
    for linger in lingers:
        onnx.batcher.limits = Limits(linger=linger / 1000)
        sentences, latencies = rate(8, 1, seconds, onnx.embed)
        print(f"| {linger:g} | {sentences:.0f} | {statistics.median(latencies) * 1000:.1f} |")
    print("\n| inputs per batch at most | 1 client x 32 | 4 clients x 32 | 8 clients x 1 |")
    print("|---|---|---|---|")
    for size in batch_sizes:
        onnx.batcher.limits = Limits(max_inputs=size)
        cells = [rate(clients, each, seconds, onnx.embed)[0]
                 for clients, each in ((1, 32), (4, 32), (8, 1))]
        print(f"| {size} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    onnx.batcher.limits = Limits()


def through_gateway(seconds: float) -> None:
    print("\n| through the gateway | 1 client x 1 | 8 clients x 1 | 1 client x 32 | "
          "4 clients x 32 | 1 x 1 latency p50 |")
    print("|---|---|---|---|---|---|")
    controller = start_controller()
    try:
        for name, engine, folder in VARIANTS:
            with cache(folder):
                worker = start_worker(controller.url, MODEL, "--engine", engine,
                                      "--model-names", "minilm")
            gateway = start_gateway(controller.url, "--log-level", "warning")
            session = requests.Session()

            def call(texts: list[str]) -> None:
                response = session.post(gateway.url + "/v1/embeddings", timeout=120,
                                        json={"model": "minilm", "input": texts})
                assert response.status_code == 200, response.text
            try:
                deadline = time.monotonic() + 60
                while "minilm" not in requests.get(gateway.url + "/ready").text:
                    assert time.monotonic() < deadline, "the gateway never saw the worker"
                    time.sleep(0.2)
                call(QUERIES[:32])
                cells = []
                for clients, size in ((1, 1), (8, 1), (1, 32), (4, 32)):
                    sentences, latencies = rate(clients, size, seconds, _per_thread(gateway.url))
                    cells.append(f"{sentences:.0f}")
                    if (clients, size) == (1, 1):
                        p50 = statistics.median(latencies) * 1000
                print(f"| {name} | " + " | ".join(cells) + f" | {p50:.1f} ms |")
            finally:
                gateway.stop()
                worker.stop()
    finally:
        controller.stop()


def _per_thread(url: str) -> Callable[[list[str]], None]:
    """A call with one pooled connection per client thread (as separate clients have)."""
    local = threading.local()

    def call(texts: list[str]) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        response = session.post(url + "/v1/embeddings", timeout=120,
                                json={"model": "minilm", "input": texts})
        assert response.status_code == 200, response.text
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--skip-gateway", action="store_true")
    parser.add_argument("--lingers", type=float, nargs="+", default=[0, 1, 2, 5])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    args = parser.parse_args()
    np.set_printoptions(precision=4)
    direct(args.seconds, args.lingers, args.batch_sizes)
    if not args.skip_gateway:
        through_gateway(args.seconds)


if __name__ == "__main__":
    main()

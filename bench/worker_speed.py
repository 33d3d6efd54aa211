"""The chat worker's speed on SmolLM2 (`flaskchat up`'s model), through the gateway and
for the engine called directly, in one run:

    python bench/worker_speed.py [--tokens 128] [--concurrency 1 8 32] [--skip-transformers]

1. The engine directly (no worker, no gateway): the ONNX export on onnxruntime, greedy,
   c prompts fed in one after another (no prefix cache), then decoded together as one batch.
2. Through the gateway (`flaskchat serve`, our controller): the onnx worker
   (`--limit-worker-concurrency 32`) and the transformers worker (`--engine transformers`),
   c clients, each streaming --rounds chat completions one after another (16 different
   requests in turn, see TASKS; temperature 0.7, max_tokens --tokens). TTFT is the first content
   chunk: "burst" is the first round (all c arrive at once), "steady" the later rounds (a
   request arrives while the others generate). Decode tokens/s of a stream is (tokens - 1)
   / (last chunk - first chunk); "total" is every token over the wall time.
3. The onnx worker's RSS after loading and at its peak while generating at c=8.

Not a test: numbers depend on the machine. Run it on an idle one.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import Server, start_controller, start_gateway, start_on_socket  # noqa

# distinct requests that share only the chat template's default system prompt (as most
# requests to a deployment do); the worker's prefix cache can reuse that much, no more
TASKS = ["Write a long story about a dragon.", "Describe a day in the life of a lighthouse "
         "keeper.", "Explain how bread is made, step by step.", "Tell me about the history of "
         "the bicycle.", "Give me a detailed travel plan for a week in Japan.", "Why is the "
         "sky blue? Explain it to a child.", "List ten ideas for a birthday party and explain "
         "each.", "Compose a letter to a friend about your new garden.", "How do airplanes "
         "stay in the air?", "Summarize the plot of a mystery novel you invent.", "What makes "
         "a good teacher? Discuss at length.", "Describe the water cycle in detail.", "Invent a "
         "new board game and explain its rules.", "Tell a fairy tale about a clever fox.",
         "Explain the rules of chess to a beginner.", "Describe a busy market in the morning."]
_asked = iter(range(10**9))


def next_prompt() -> list[dict[str, str]]:
    return [{"role": "user", "content": TASKS[next(_asked) % len(TASKS)]}]


ONNX_MODEL, TORCH_MODEL = "SmolLM2-135M-Instruct", "SmolLM2-transformers"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def rss_mib(pid: int) -> float:
    """The process's and its children's (gunicorn's worker) resident memory."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for process in [str(pid), *children]:
        for line in Path(f"/proc/{process}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


Run = tuple[int, float, float, int]  # tokens, asked -> first, first -> last, round


def summary(name: str, c: int, runs: list[Run], wall: float) -> dict[str, Any]:
    rates = [(n - 1) / span for n, _, span, _ in runs if n > 1 and span > 0]
    burst = [ttft * 1000 for _, ttft, _, round_ in runs if round_ == 0]
    steady = [ttft * 1000 for _, ttft, _, round_ in runs if round_ > 0] or burst
    return {"name": name, "c": c, "stream": statistics.median(rates),
            "total": sum(n for n, *_ in runs) / wall, "burst_p50": percentile(burst, 0.5),
            "ttft_p50": percentile(steady, 0.5), "ttft_p99": percentile(steady, 0.99)}


# ---- the engine directly ------------------------------------------------------------------

def engine_direct(tokens: int, concurrency: list[int]) -> list[dict[str, Any]]:
    import numpy as np
    from transformers import AutoConfig, AutoTokenizer

    from app.worker import loading
    from app.worker.onnx_decoder import OnnxDecoder
    from app.worker.onnx_export import exported

    folder = loading.transformers_folder(loading.resolve("smollm2"))
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [tokenizer(tokenizer.apply_chat_template(
        [{"role": "user", "content": task}], tokenize=False,
        add_generation_prompt=True))["input_ids"] for task in TASKS]
    head_dim = config.hidden_size // config.num_attention_heads
    longest = max(len(ids) for ids in prompts)
    decoder = OnnxDecoder(exported(folder), max(concurrency), longest + tokens + 1, head_dim)
    decoder.prefill(0, prompts[0])  # warm-up
    decoder.free(0)
    rows = []
    for c in concurrency:
        began = time.monotonic()
        firsts, nexts = [], []
        for row in range(c):
            ids = prompts[row % len(prompts)]
            nexts.append(int(np.argmax(decoder.prefill(row, ids)[-1])))
            firsts.append(time.monotonic())
        for _ in range(tokens - 1):
            nexts = [int(t) for t in np.argmax(decoder.decode(nexts), axis=-1)]
        ended = time.monotonic()
        for row in range(c):
            decoder.free(row)
        runs = [(tokens, first - began, ended - first, 0) for first in firsts]
        rows.append(summary("engine directly (onnxruntime, greedy)", c, runs, ended - began))
    return rows


# ---- through the gateway ------------------------------------------------------------------

def stream(gateway: str, model: str, tokens: int, out: list[Run], round_: int = 0) -> None:
    asked = time.monotonic()
    first = last = 0.0
    count = 0
    with requests.post(gateway + "/v1/chat/completions", stream=True, timeout=600, json={
            "model": model, "messages": next_prompt(), "max_tokens": tokens, "temperature": 0.7,
            "stream": True, "stream_options": {"include_usage": True}}) as response:
        for line in response.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            chunk = orjson.loads(line[6:])
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.monotonic()
                first = first or last
    out.append((count, first - asked, last - first, round_))


def client(gateway: str, model: str, tokens: int, rounds: int, out: list[Run]) -> None:
    for round_ in range(rounds):
        stream(gateway, model, tokens, out, round_)


def through_gateway(gateway: str, model: str, name: str, tokens: int, rounds: int,
                    concurrency: list[int], worker_pid: int = 0,
                    peaks: dict[int, float] | None = None) -> list[dict[str, Any]]:
    stream(gateway, model, 8, [])  # warm-up
    rows = []
    for c in concurrency:
        runs: list[Run] = []
        threads = [threading.Thread(target=client,
                                    args=(gateway, model, tokens, rounds, runs))
                   for _ in range(c)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        peak = 0.0
        while any(t.is_alive() for t in threads):
            if worker_pid:
                peak = max(peak, rss_mib(worker_pid))
            time.sleep(0.05)
        rows.append(summary(name, c, runs, time.monotonic() - began))
        if peaks is not None:
            peaks[c] = peak
    return rows


def worker(controller: str, model: str, *flags: str) -> Server:
    return start_on_socket(
        [sys.executable, "-m", "app.cli", "worker", "--fd", "{fd}", "--model-path", "smollm2",
         "--model-names", model, "--worker-address", "http://127.0.0.1:{port}",
         "--controller-address", controller, "--log-level", "warning", *flags], "/health")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    import onnxruntime

    rows = engine_direct(args.tokens, args.concurrency)
    servers: list[Server] = []
    peaks: dict[int, float] = {}
    try:
        controller = start_controller()
        servers.append(controller)
        started = time.monotonic()
        onnx_worker = worker(controller.url, ONNX_MODEL, "--limit-worker-concurrency",
                             str(max(args.concurrency)))
        servers.append(onnx_worker)
        load_seconds = time.monotonic() - started
        loaded_rss = rss_mib(onnx_worker.process.pid)
        if not args.skip_transformers:
            servers.append(worker(controller.url, TORCH_MODEL, "--engine", "transformers",
                                  "--limit-worker-concurrency", "8"))
        gateway = start_gateway(controller.url)
        servers.append(gateway)
        wanted = 1 if args.skip_transformers else 2
        while len(requests.get(gateway.url + "/ready").json().get("models", [])) < wanted:
            time.sleep(0.2)
        rows += through_gateway(gateway.url, ONNX_MODEL, "gateway -> onnx worker",
                                args.tokens, args.rounds, args.concurrency,
                                onnx_worker.process.pid, peaks)
        if not args.skip_transformers:
            rows += through_gateway(gateway.url, TORCH_MODEL, "gateway -> transformers worker",
                                    args.tokens, 1, [c for c in args.concurrency if c <= 8])
    finally:
        for server in reversed(servers):
            server.stop()
    print(f"\nonnxruntime {onnxruntime.__version__}, int4 weights (MatMulNBits), float32 "
          f"activations and cache; {args.tokens} tokens per stream\n")
    print("| path | streams | decode tokens/s per stream (p50) | total tokens/s | TTFT p50 ms "
          "(steady) | TTFT p99 ms (steady) | TTFT p50 ms (burst) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {row['c']} | {row['stream']:.1f} | {row['total']:.1f} | "
              f"{row['ttft_p50']:.0f} | {row['ttft_p99']:.0f} | {row['burst_p50']:.0f} |")
    print(f"\nonnx worker: ready in {load_seconds:.1f} s (export cached), RSS {loaded_rss:.0f} "
          f"MiB loaded, peak " + ", ".join(f"{peaks[c]:.0f} MiB at c={c}" for c in peaks))


if __name__ == "__main__":
    main()

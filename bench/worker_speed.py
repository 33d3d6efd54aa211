"""Load time, tokens/s and memory of `flaskchat worker` on a model (default: SmolLM2).

    python bench/worker_speed.py [--model-path smollm2] [--tokens 128] [--concurrency 1 4]

Starts the worker on a free port without a controller, times the start until it answers,
generates greedy replies straight against it (1 and N streams at once), and reads the
worker process's RSS from /proc. Not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_mib(pid: int) -> float:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                              text=True).stdout.split()
    total = 0
    for p in [str(pid), *children]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def generate(url: str, tokens: int, results: list[tuple[int, float]]) -> None:
    started = time.monotonic()
    body = requests.post(url + "/worker_generate", json={
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        "temperature": 0.7, "seed": len(results), "echo": False,
        "max_new_tokens": tokens}, timeout=600).json()
    results.append((body["usage"]["completion_tokens"], time.monotonic() - started))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", default="smollm2")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--no-register",
                               "--host", "127.0.0.1", "--port", str(port), "--model-path",
                               args.model_path, "--dtype", args.dtype, "--log-level",
                               "warning"], cwd=ROOT)
    try:
        while True:
            try:
                requests.get(url + "/health", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.1)
        print(f"start until ready: {time.monotonic() - started:.1f} s "
              f"(process start, imports, model load)")
        print(f"RSS after load: {rss_mib(worker.pid):.0f} MiB")
        generate(url, 8, [])  # warm-up
        for n in args.concurrency:
            results: list[tuple[int, float]] = []
            threads = [threading.Thread(target=generate, args=(url, args.tokens, results))
                       for _ in range(n)]
            began = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.monotonic() - began
            per_stream = sum(count / seconds for count, seconds in results) / len(results)
            total = sum(count for count, _ in results)
            print(f"{n} at once: {per_stream:.1f} tokens/s per stream, {total / wall:.1f} "
                  f"tokens/s in all ({total} tokens), RSS {rss_mib(worker.pid):.0f} MiB")
    finally:
        worker.terminate()
        worker.wait()


if __name__ == "__main__":
    main()

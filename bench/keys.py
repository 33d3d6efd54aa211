"""What per-key access costs: chat c=64 through one gateway process with auth off, then
with 1,000 keys in the database (every one with rpm and tpm limits, requests spread over
all of them) counted in process memory, then counted in Redis; and the CPU that writing
the usage records takes per request.

    python bench/keys.py [--seconds 10] [--keys 1000] [--rounds 2]

Starts on 127.0.0.1: the counting controller, the fast fake worker, a redis-server
(Debian's) and, for each setup, a gateway (one process, an SQLite file of its own). The
setups alternate for --rounds rounds so that a drift of the machine hits each alike, and
each ratio is taken within a round.
Writes Markdown and JSON under bench/results/. Not part of the tests.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from statistics import median  # noqa: E402
from typing import Any  # noqa: E402

import orjson  # noqa: E402
import requests  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import load  # noqa: E402
from run import (CHAT_BODY, MODEL, ROOT, children, cpu_seconds, spawn_on_socket,  # noqa: E402
                 summarize, wait_for)

USERS = 64


def make_keys(url: str, count: int) -> list[str]:
    from app.access.database import engine_for, upgrade
    from app.access.keys import KeyStore

    upgrade(url)
    store = KeyStore(engine_for(url))
    # Limits no bench run reaches: every request pays for the check, none is refused.
    return [store.create(f"bench-{i:04d}", None, team=f"team-{i % 10}", rpm=10_000_000,
                         tpm=1_000_000_000)[1] for i in range(count)]


def usage_cpu_per_record(url: str, records: int = 20_000) -> float:
    """CPU ms per request of what the usage ledger does: a record made and buffered on the
    request's side, written in batches by the ledger (here by flush, in one thread)."""
    from app.access.database import engine_for, upgrade
    from app.access.keys import now
    from app.access.usage import UsageLedger, UsageRecord

    upgrade(url)
    ledger = UsageLedger(engine_for(url), flush_interval=3600)
    started = time.process_time()
    for i in range(records):
        ledger.add(UsageRecord(
            created_at=now(), key_id=f"key_{i % 1000:016x}", key_name=f"bench-{i % 1000:04d}",
            team=f"team-{i % 10}", model=MODEL, route="/v1/chat/completions", status=200,
            prompt_tokens=12, completion_tokens=64, latency_ms=3.2, ttft_ms=None,
            request_id=f"req-{i}"))
        if i % 500 == 499:  # about what one flush interval holds at this rate
            ledger.flush()
    ledger.flush()
    return (time.process_time() - started) * 1000 / records


class Setup:
    def __init__(self, name: str, controller: str, database_url: str, redis_url: str,
                 secrets: list[str]) -> None:
        self.name = name
        python = sys.executable
        argv = [python, "-m", "app.cli", "serve", "--fd", "{fd}", "--workers", "1",
                "--worker-connections", "20000", "--controller-address", controller,
                "--log-level", "warning", "--database-url", database_url]
        if redis_url:
            argv += ["--redis-url", redis_url]
        self.process, self.port = spawn_on_socket(argv)
        wait_for(f"http://127.0.0.1:{self.port}/health")
        deadline = time.monotonic() + 30
        while MODEL not in requests.get(f"http://127.0.0.1:{self.port}/ready").text:
            if time.monotonic() > deadline:
                raise SystemExit("the gateway never saw the worker")
            time.sleep(0.2)
        body = orjson.dumps(CHAT_BODY)
        self.requests = [load.Request("/v1/chat/completions", body, "json",
                                      f"Authorization: Bearer {secret}\r\n".encode())
                         for secret in secrets] or \
            [load.Request("/v1/chat/completions", body, "json")]

    def measure(self, seconds: float) -> dict[str, Any]:
        pids = children(self.process.pid)
        before = cpu_seconds(pids)
        outcome = load.run("127.0.0.1", self.port, self.requests, USERS, seconds, 10**7)
        result = summarize(outcome)
        result["cpu_ms_per_request"] = (cpu_seconds(pids) - before) * 1000 / max(
            result["requests"] + USERS, 1)
        return result

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="flaskchat-bench-keys-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        controller_process, port = spawn_on_socket([
            sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "16",
            "--keep-alive", "75", "--no-control-socket", "--log-level", "warning",
            "--bind", "fd://{fd}", "bench.counting_controller:app"])
        processes.append(controller_process)
        controller = f"http://127.0.0.1:{port}"
        wait_for(controller + "/test_connection")
        worker = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fast_worker.py"),
                                   "--controller", controller, "--model", MODEL], cwd=ROOT,
                                  stdout=subprocess.PIPE)
        processes.append(worker)
        assert worker.stdout is not None
        worker.stdout.readline()
        redis_port = int(load_free_port())
        redis_binary = shutil.which("redis-server")
        if redis_binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        processes.append(subprocess.Popen(
            [redis_binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL))
        redis_url = f"redis://127.0.0.1:{redis_port}/0"

        open_db = f"sqlite:///{workdir}/open.db"
        keyed_db = f"sqlite:///{workdir}/keyed.db"
        started = time.perf_counter()
        secrets = make_keys(keyed_db, args.keys)
        print(f"{args.keys} keys made in {time.perf_counter() - started:.1f} s", flush=True)
        setups = [("auth off", open_db, "", []),
                  (f"{args.keys} keys, limits in memory", keyed_db, "", secrets),
                  (f"{args.keys} keys, limits in Redis", keyed_db, redis_url, secrets)]
        results: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in setups}
        for round_number in range(args.rounds):
            # A different setup goes first each round: no setup always runs first.
            turn = round_number % len(setups)
            for name, url, redis, keys in setups[turn:] + setups[:turn]:
                setup = Setup(name, controller, url, redis, keys)
                try:
                    results[name].append(setup.measure(args.seconds))
                finally:
                    setup.stop()
                print(name, json.dumps(results[name][-1]), flush=True)
        usage_ms = usage_cpu_per_record(f"sqlite:///{workdir}/usage.db")
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)

    # Paired: each round's setups ran back to back, so a round's ratio is what survives a
    # drift of the machine; the table gives the medians over the rounds.
    base_runs = results["auth off"]
    lines = [f"# Per-key access, chat c={USERS}, one process, {args.seconds:.0f} s a run, "
             f"median of {args.rounds} rounds ({datetime.now():%Y-%m-%d})", "",
             "| setup | req/s | ratio to auth off (same round) | p50 ms | p99 ms | "
             "CPU ms/request | errors |", "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        ratios = [run["rps"] / base["rps"] for run, base in zip(runs, base_runs)]
        lines.append(
            f"| {name} | {median(r['rps'] for r in runs):.0f} | {median(ratios):.2f} "
            f"({', '.join(f'{ratio:.2f}' for ratio in ratios)}) | "
            f"{median(r['p50_ms'] for r in runs):.1f} | {median(r['p99_ms'] for r in runs):.1f} | "
            f"{median(r['cpu_ms_per_request'] for r in runs):.3f} | "
            f"{sum(r['errors'] for r in runs)} |")
    lines += ["", f"Usage records (made, buffered, written in batches to SQLite): "
              f"{usage_ms:.4f} ms CPU per request."]
    report = "\n".join(lines) + "\n"
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"{stamp}-keys.json").write_text(json.dumps(
        {"runs": results, "usage_cpu_ms_per_record": usage_ms}, indent=1))
    (out / f"{stamp}-keys.md").write_text(report)
    print(report)


def load_free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    main()

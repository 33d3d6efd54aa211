"""The benchmark: every phase through the gateway and straight at the worker, in one run.

    python bench/run.py [--workers 1] [--seconds 5] [--capacity 5000] [--model-capacity N]

Starts, on 127.0.0.1: flaskchat's controller (with a request counter), the fast fake worker
(bench/fast_worker.py) and the gateway under gunicorn with gevent workers. Writes a Markdown
table and the raw numbers as JSON under bench/results/. Not part of the tests.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import orjson  # noqa: E402
import requests  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench-model"
CHAT_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}],
             "max_tokens": 64}
WORKER_PARAMS = {"model": MODEL, "temperature": 0.7, "logprobs": None, "top_p": 1.0,
                 "top_k": -1, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                 "echo": False, "stop_token_ids": None, "stop": [], "prompt": "",
                 "max_new_tokens": 64, "messages": [{"role": "user", "content": "Hello there"}]}
EMBED_INPUTS = [f"benchmark sentence number {i}" for i in range(16)]


@dataclass
class Phase:
    name: str
    kind: str  # chat | stream | embed
    users: int


PHASES = [Phase("chat c=1", "chat", 1), Phase("chat c=8", "chat", 8),
          Phase("chat c=64", "chat", 64), Phase("stream c=1", "stream", 1),
          Phase("stream c=64", "stream", 64), Phase("stream c=256", "stream", 256),
          Phase("embeddings(16) c=8", "embed", 8),
          # A model served by an OpenAI-compatible upstream (the same fast worker's
          # /v1/chat/completions), relayed instead of translated from the worker protocol.
          Phase("relay chat c=64", "relay-chat", 64),
          Phase("relay stream c=256", "relay-stream", 256),
          # The Responses API, translated onto the chat path: stored (the default) or not.
          Phase("responses c=64", "responses", 64),
          Phase("responses store c=64", "responses-store", 64),
          Phase("responses stream c=256", "responses-stream", 256),
          Phase("responses stream store c=256", "responses-stream-store", 256)]
RELAY_MODEL = "relay-model"


def requests_for(kind: str, extra: str = "") -> tuple[load.Request, load.Request]:
    """(through the gateway, straight at the worker)."""
    chat, params = dict(CHAT_BODY), dict(WORKER_PARAMS)
    if extra:
        chat["messages"] = [{"role": "user", "content": extra}]
        params["messages"] = chat["messages"]
    if kind == "chat":
        return (load.Request("/v1/chat/completions", orjson.dumps(chat), "json"),
                load.Request("/worker_generate", orjson.dumps(params), "json"))
    if kind == "stream":
        chat["stream"] = True
        return (load.Request("/v1/chat/completions", orjson.dumps(chat), "sse"),
                load.Request("/worker_generate_stream", orjson.dumps(params), "frames"))
    if kind.startswith("responses"):
        stream = "stream" in kind
        body = {"model": MODEL, "input": chat["messages"][0]["content"],
                "max_output_tokens": 64, "store": kind.endswith("store"), "stream": stream}
        direct = "/worker_generate_stream" if stream else "/worker_generate"
        return (load.Request("/v1/responses", orjson.dumps(body), "events" if stream else "json"),
                load.Request(direct, orjson.dumps(params), "frames" if stream else "json"))
    if kind.startswith("relay-"):
        chat["model"] = RELAY_MODEL
        stream = kind == "relay-stream"
        chat["stream"] = stream
        body = orjson.dumps(chat)
        answer = "sse" if stream else "json"
        return (load.Request("/v1/chat/completions", body, answer),
                load.Request("/v1/chat/completions", body, answer))
    body = orjson.dumps({"model": MODEL, "input": EMBED_INPUTS})
    return (load.Request("/v1/embeddings", body, "json"),
            load.Request("/worker_get_embeddings", body, "json"))


# ---- processes -----------------------------------------------------------------------------

def bound_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    return sock


def spawn_on_socket(argv: list[str], env: dict[str, str] | None = None, root: Path = ROOT
                    ) -> tuple[subprocess.Popen[bytes], int]:
    """``root``: the checkout whose code runs (another revision's, for a comparison)."""
    sock = bound_socket()
    port = sock.getsockname()[1]
    process = subprocess.Popen([a.replace("{fd}", str(sock.fileno())) for a in argv], cwd=root,
                               pass_fds=(sock.fileno(),),
                               env={**os.environ, **(env or {}), "PYTHONPATH": str(root)})
    sock.close()
    return process, port


def wait_for(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_by_process(pids).values())


def cpu_by_process(pids: list[int]) -> dict[int, float]:
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # gone meanwhile
            continue
        seconds[pid] = (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def helpers(pids: list[int]) -> list[int]:
    """The processes the gateway's workers started (their span export helpers)."""
    return [child for pid in pids for child in children(pid)]


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


# ---- measuring -------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(outcome: load.Outcome) -> dict[str, Any]:
    good = [s for s in outcome.samples if s.error is None]
    errors = len(outcome.samples) - len(good) + outcome.connect_errors
    latencies = [s.latency * 1000 for s in good]
    ttfts = [s.ttft * 1000 for s in good if s.ttft is not None]
    tokens = sum(s.tokens for s in good)
    elapsed = outcome.elapsed or 1e-9
    first_error = next((s.error for s in outcome.samples if s.error), None)
    return {"requests": len(good), "errors": errors, "first_error": first_error,
            "rps": len(good) / elapsed, "p50_ms": percentile(latencies, 0.5),
            "p99_ms": percentile(latencies, 0.99), "ttft_p50_ms": percentile(ttfts, 0.5),
            "ttft_p99_ms": percentile(ttfts, 0.99), "tokens_per_s": tokens / elapsed}


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]  # gunicorn's master
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.processes: list[subprocess.Popen[bytes]] = []
        self.scratch: tempfile.TemporaryDirectory[str] | None = None
        self.databases = 0

    def start(self) -> None:
        self.start_backends()
        self.use(self.start_gateway())

    def start_backends(self) -> None:
        """The controller and the fast worker."""
        python = sys.executable
        controller, port = spawn_on_socket([
            python, "-m", "gunicorn", "-k", "gthread", "--threads", "16", "--keep-alive", "75",
            "--no-control-socket", "--log-level", "warning", "--bind", "fd://{fd}",
            "bench.counting_controller:app"])
        self.processes.append(controller)
        self.controller = f"http://127.0.0.1:{port}"
        wait_for(self.controller + "/test_connection")
        worker = subprocess.Popen([python, str(ROOT / "bench" / "fast_worker.py"),
                                   "--controller", self.controller, "--model", MODEL]
                                  + (["--stock"] if self.args.stock else []),
                                  cwd=ROOT, stdout=subprocess.PIPE)
        self.processes.append(worker)
        assert worker.stdout is not None
        self.worker_port = int(worker.stdout.readline().split()[1])
        self.worker = f"http://127.0.0.1:{self.worker_port}"

    def start_gateway(self, env: dict[str, str] | None = None, root: Path = ROOT,
                      wait: bool = True) -> Gateway:
        """A gateway (its own database; ``env``: added to its environment; ``root``: the
        checkout it runs from), serving once it sees the worker (``wait``: returns then,
        else at once and ``ready`` waits)."""
        process, port = spawn_on_socket([
            sys.executable, "-m", "app.cli", "serve", "--fd", "{fd}", "--workers",
            str(self.args.workers), "--worker-connections", "20000", "--controller-address",
            self.controller, "--log-level", "warning",
            "--openai-upstream", f"{RELAY_MODEL}={self.worker}/v1",
            "--database-url", self.database_url()]
            + (["--model-capacity", f"{MODEL}={self.args.model_capacity}"]
               if self.args.model_capacity else [])
            + (["--redis-url", self.args.redis_url] if self.args.redis_url else []), env, root)
        self.processes.append(process)
        gateway = Gateway(process, port)
        if wait:
            self.ready(gateway)
        return gateway

    def ready(self, gateway: Gateway) -> None:
        wait_for(gateway.url + "/health")
        deadline = time.monotonic() + 30
        while MODEL not in requests.get(gateway.url + "/ready").text:
            if time.monotonic() > deadline:
                raise SystemExit("the gateway never saw the worker")
            time.sleep(0.2)

    def stop_gateways(self, gateways: list[Gateway]) -> None:
        """Stops them (each drains, and sends its last spans)."""
        for gateway in gateways:
            gateway.process.terminate()
        for gateway in gateways:
            try:
                gateway.process.wait(60)
            except subprocess.TimeoutExpired:
                gateway.process.kill()
                gateway.process.wait()
            self.processes.remove(gateway.process)

    def use(self, gateway: Gateway) -> None:
        """Which gateway the phases load."""
        self.gateway_pid, self.gateway_port, self.gateway = gateway.pid, gateway.port, gateway.url

    def database_url(self) -> str:
        """A new SQLite file for each run (stored responses from earlier runs would make
        runs differ), unless --database-url names one (a full store, say)."""
        if self.args.database_url:
            return str(self.args.database_url)
        if self.scratch is None:
            self.scratch = tempfile.TemporaryDirectory(prefix="flaskchat-bench-")
        self.databases += 1
        return f"sqlite:///{self.scratch.name}/bench{self.databases}.db"

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()

    def counters(self, reset: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        verb = requests.post if reset else requests.get
        path = "/bench/reset" if reset else "/bench/stats"
        return verb(self.worker + path).json(), verb(self.controller + path).json()

    def phase(self, phase: Phase, ceiling: bool = True) -> dict[str, Any]:
        """The phase through the gateway in use, then (``ceiling``) straight at the
        worker."""
        through, direct = requests_for(phase.kind)
        count = self.args.max_requests
        pids = children(self.gateway_pid)
        self.counters(reset=True)
        cpu_before = cpu_seconds(pids)
        helpers_before = cpu_by_process(helpers(pids))
        outcome = load.run("127.0.0.1", self.gateway_port, through, phase.users,
                           self.args.seconds, count)
        gateway = summarize(outcome)
        served = gateway["requests"] + phase.users  # the warm-ups count too
        gateway["cpu_ms_per_request"] = (cpu_seconds(pids) - cpu_before) * 1000 / served
        # Helpers started during the phase count from their start
        gateway["helper_cpu_ms_per_request"] = sum(
            seconds - helpers_before.get(pid, 0.0)
            for pid, seconds in cpu_by_process(helpers(pids)).items()) * 1000 / served
        gateway["rss_mib"] = rss_kib(pids) / 1024
        worker_stats, controller_stats = self.counters()
        gateway["worker_calls_per_request"] = sum(worker_stats["calls"].values()) / served
        gateway["new_worker_connections"] = worker_stats["connections"]
        gateway["controller_calls"] = sum(controller_stats["calls"].values())
        key = "tokens_per_s" if "stream" in phase.kind else "rps"
        if not ceiling:
            return {"phase": phase.name, "users": phase.users, "gateway": gateway,
                    "ratio_of": key}
        direct_outcome = summarize(load.run("127.0.0.1", self.worker_port, direct,
                                            phase.users, self.args.seconds, count))
        ratio = gateway[key] / direct_outcome[key] if direct_outcome[key] else None
        return {"phase": phase.name, "users": phase.users, "gateway": gateway,
                "ceiling": direct_outcome, "ratio": ratio, "ratio_of": key}

    def capacity(self) -> dict[str, Any]:
        streams = self.args.capacity
        extra = f"[[delay:{self.args.capacity_delay}]][[tokens:{self.args.capacity_tokens}]]"
        through, direct = requests_for("stream", extra)
        pids = children(self.gateway_pid)
        before = rss_kib(pids)
        peak: dict[str, float] = {}

        def at_peak() -> None:
            peak["rss_kib"] = rss_kib(pids)
        timeout = self.args.capacity_delay * self.args.capacity_tokens + 120
        outcome = load.hold("127.0.0.1", self.gateway_port, through, streams,
                            self.args.ramp, timeout, at_peak)
        gateway = summarize(outcome)
        gateway["rss_kib_per_stream"] = (peak.get("rss_kib", before) - before) / streams
        gateway["rss_mib_at_peak"] = peak.get("rss_kib", before) / 1024
        ceiling = summarize(load.hold("127.0.0.1", self.worker_port, direct, streams,
                                      self.args.ramp, timeout, lambda: None))
        return {"phase": f"capacity {streams} streams", "users": streams, "gateway": gateway,
                "ceiling": ceiling, "ratio": None, "ratio_of": "tokens_per_s"}


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"# flaskchat benchmark: --workers {args.workers}, {args.seconds:.0f} s per phase",
             "",
             "| phase | target | req/s | p50 ms | p99 ms | TTFT p50 | TTFT p99 | tokens/s | "
             "errors | ratio | gw CPU ms/req | worker calls/req | new conns | ctrl calls |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for target in ("gateway", "ceiling"):
            r = row[target]
            ratio = fmt(row["ratio"], 3) if target == "gateway" else ""
            lines.append(
                f"| {row['phase']} | {target} | {fmt(r['rps'])} | {fmt(r['p50_ms'], 2)} | "
                f"{fmt(r['p99_ms'], 2)} | {fmt(r['ttft_p50_ms'], 2)} | "
                f"{fmt(r['ttft_p99_ms'], 2)} | {fmt(r['tokens_per_s'], 0)} | {r['errors']} | "
                f"{ratio} | {fmt(r.get('cpu_ms_per_request'), 3)} | "
                f"{fmt(r.get('worker_calls_per_request'), 2)} | "
                f"{fmt(r.get('new_worker_connections'))} | {fmt(r.get('controller_calls'))} |")
    for row in rows:
        if "rss_kib_per_stream" in row["gateway"]:
            lines += ["", f"Capacity: {row['users']} streams open at once through one gateway "
                      f"process: {row['gateway']['errors']} errors, "
                      f"{row['gateway']['rss_kib_per_stream']:.1f} KiB RSS per stream "
                      f"({row['gateway']['rss_mib_at_peak']:.0f} MiB at the peak)."]
    added = {r["phase"]: r for r in rows}
    if "chat c=1" in added and "stream c=1" in added:
        chat, stream = added["chat c=1"], added["stream c=1"]
        latency = chat["gateway"]["p50_ms"] - chat["ceiling"]["p50_ms"]
        ttft = stream["gateway"]["ttft_p50_ms"] - stream["ceiling"]["ttft_p50_ms"]
        lines += ["", f"Added latency at c=1: {latency:.2f} ms p50 (non-stream); added TTFT "
                  f"{ttft:.2f} ms p50."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--phases", nargs="*",
                        help="names to run, in that order (default: all)")
    parser.add_argument("--capacity", type=int, default=5000, help="0 skips the phase")
    parser.add_argument("--capacity-delay", type=float, default=1.0)
    parser.add_argument("--capacity-tokens", type=int, default=30)
    parser.add_argument("--ramp", type=float, default=1000.0, help="new streams per second")
    parser.add_argument("--redis-url", default="",
                        help="a Redis for the gateway (limits and the fair-share lines)")
    parser.add_argument("--model-capacity", type=int, default=0,
                        help="the worker's capacity for the gateway's fair-share line "
                        "(0: not known, no line); a large one measures the line's cost "
                        "when nothing waits")
    parser.add_argument("--database-url", default="",
                        help="the gateway's database (default: a new SQLite file)")
    parser.add_argument("--stock", action="store_true",
                        help="the worker does not check lengths (two calls per request)")
    args = parser.parse_args()
    by_name = {phase.name: phase for phase in PHASES}
    unknown = [name for name in args.phases or [] if name not in by_name]
    if unknown:
        parser.error(f"no phase {unknown[0]!r}; the phases are: {', '.join(by_name)}")
    # Phases run in the order given: a phase that runs later meets a gateway that has
    # served more (its caches, its database), so comparisons should swap the order too.
    chosen = [by_name[name] for name in args.phases] if args.phases else PHASES
    bench = Bench(args)
    rows: list[dict[str, Any]] = []
    try:
        bench.start()
        for phase in chosen:
            rows.append(bench.phase(phase))
            print(json.dumps(rows[-1]), flush=True)
        if args.capacity:
            rows.append(bench.capacity())
            print(json.dumps(rows[-1]), flush=True)
    finally:
        bench.stop()
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-workers{args.workers}"
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    report = markdown(rows, args)
    (out / f"{name}.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()

"""What OpenTelemetry tracing costs the gateway (issue 27): bench/run.py's "chat c=64" and
"stream c=256" phases against three gateways that run side by side (tracing off, on at 100%
sampling, on at 1%) with the same controller and fast worker, the spans going to a local
OTLP/HTTP endpoint.

    python bench/tracing_overhead.py [--rounds 10] [--seconds 3] [--baseline REV]

``--baseline REV`` adds a fourth gateway, run from a checkout of revision REV (the one
before tracing, say), to show that "off" costs nothing.

Each round starts the three gateways anew and loads one at a time: each phase against
each gateway in turn, a short slice each, and each round starts with another gateway.
The machine's drift (10-25% between runs of minutes on this VM) then falls alike on all
three, each round gives a paired ratio, and the rounds' new processes average out what
differs between two processes of the same code (3-12% here, for as long as they ran).
Separate runs of bench/run.py per mode, as this bench did first, could not tell 5% apart.

The endpoint reads each export and answers 200 without decoding it (a real collector runs
elsewhere; decoding here would take CPU from the gateway on the same cores); the exports
are decoded after each slice, to count the spans that arrived per request (spans dropped
under load would show there). The gateway's numbers are compared, not the ceiling's:
tracing changes nothing at the worker. Not a test: run it on an idle machine.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import requests  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PHASES as ALL_PHASES, ROOT, Bench  # noqa: E402

PHASES = [phase for phase in ALL_PHASES if phase.name in ("chat c=64", "stream c=256")]
MODES = {
    "off": {},
    "on, 100%": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
    "on, 1%": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
               "OTEL_TRACES_SAMPLER_ARG": "0.01"},
}


class Sink:
    """An OTLP/HTTP endpoint that takes every export and keeps it undecoded; GET gives the
    count of spans received per service name (decoded then)."""

    def __init__(self) -> None:
        self.posts = 0
        self.bytes = 0
        self.bodies: list[bytes] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keeps the connection, as collectors do

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                size = int(self.headers.get("Content-Length") or 0)
                sink.bodies.append(self.rfile.read(size))
                sink.posts += 1
                sink.bytes += size
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                body = json.dumps({"spans": sink.spans(), "exports": sink.posts,
                                   "bytes": sink.bytes}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def spans(self) -> dict[str, int]:
        """The spans received, by service name."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import \
            ExportTraceServiceRequest

        counts: dict[str, int] = {}
        for body in self.bodies:
            request = ExportTraceServiceRequest.FromString(body)
            for resource in request.resource_spans:
                service = next((a.value.string_value for a in resource.resource.attributes
                                if a.key == "service.name"), "")
                counts[service] = counts.get(service, 0) + sum(
                    len(scope.spans) for scope in resource.scope_spans)
        return counts


def start_sink() -> tuple[subprocess.Popen[str], str]:
    """The sink in a process of its own: its reading of the exports is not the load
    generator's CPU."""
    process = subprocess.Popen([sys.executable, __file__, "--sink"], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--baseline", metavar="REV",
                        help="also a gateway from this git revision, tracing off")
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        sink = Sink()
        print(sink.url, flush=True)
        sink.server.serve_forever()
        return
    sink_process, sink_url = start_sink()
    bench = Bench(argparse.Namespace(
        workers=1, seconds=args.seconds, max_requests=200_000, stock=False, model_capacity=0,
        redis_url="", database_url=""))
    names = [phase.name for phase in PHASES]
    modes = dict(MODES)
    checkout = None
    if args.baseline:
        checkout = tempfile.TemporaryDirectory(prefix="flaskchat-baseline-")
        subprocess.run(["git", "worktree", "add", "--detach", checkout.name + "/tree",
                        args.baseline],
                       cwd=ROOT, check=True, capture_output=True)
        modes[f"off, at {args.baseline}"] = {}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        mode: {name: [] for name in names} for mode in modes}
    expected = {mode: 0 for mode in modes}
    try:
        bench.start_backends()
        order = list(modes)
        for round_number in range(args.rounds):
            # New gateways each round: two gateways of the same code, started alike and
            # loaded in turn, differed by 3-12% for as long as they ran. Each traced one
            # has its own service name, by which its spans are counted.
            gateways = {mode: bench.start_gateway(
                {**extra, "OTEL_EXPORTER_OTLP_ENDPOINT": sink_url,
                 "OTEL_SERVICE_NAME": f"bench{number}"} if extra else {}, wait=False)
                for number, (mode, extra) in enumerate(MODES.items())}
            if checkout is not None:
                gateways[f"off, at {args.baseline}"] = bench.start_gateway(
                    root=Path(checkout.name) / "tree", wait=False)
            for gateway in gateways.values():
                bench.ready(gateway)
            shift = round_number % len(order)
            line = []
            for phase in PHASES:
                for mode in order[shift:] + order[:shift]:
                    bench.use(gateways[mode])
                    gateway = bench.phase(phase, ceiling=False)["gateway"]
                    # A chat request makes 2 spans (request, upstream attempt), a stream 3
                    # (and the stream); the warm-up requests count.
                    expected[mode] += (3 if phase.kind == "stream" else 2) * (
                        gateway["requests"] + phase.users)
                    results[mode][phase.name].append(gateway)
                    line.append(f"{phase.name} {mode}: {_rate(gateway, phase.name):.0f}")
            bench.stop_gateways(list(gateways.values()))
            print(f"round {round_number + 1}: " + ", ".join(line), flush=True)
    finally:
        bench.stop()  # (which flushes the gateways' last spans)
        if checkout is not None:
            subprocess.run(["git", "worktree", "remove", "--force", checkout.name + "/tree"],
                           cwd=ROOT, check=False)
    received = requests.get(sink_url, timeout=600).json()
    sink_process.terminate()
    arrived = {mode: received["spans"].get(f"bench{number}-gateway", 0) / (expected[mode] or 1)
               for number, mode in enumerate(MODES) if MODES[mode]}
    report(results, names, arrived)
    print(f"\n{received['exports']} exports, {received['bytes'] / 2**20:.1f} MiB of spans "
          "in all")


def report(results: dict[str, dict[str, list[dict[str, Any]]]], names: list[str],
           arrived: dict[str, float]) -> None:
    print("\n| tracing | " + " | ".join(f"{p} ({_unit(p)})" for p in names)
          + " | vs off (median of each round's ratio, and its quartiles) | vs off (medians) | "
          + " | ".join(f"CPU ms/request, {p}: gateway + export helper" for p in names)
          + " | spans arrived, of the requests' |")
    print("|---|" + "---|" * (2 * len(names) + 3))
    baseline = {p: statistics.median(_rate(g, p) for g in results["off"][p]) for p in names}
    for mode in results:
        rates = {p: statistics.median(_rate(g, p) for g in results[mode][p]) for p in names}
        ratios = " / ".join(f"{rates[p] / baseline[p]:.3f}" for p in names)
        paired = " / ".join(_spread([_rate(on, p) / _rate(off, p) for on, off in
                                     zip(results[mode][p], results["off"][p])])
                            for p in names)
        cpu = " | ".join(
            f"{statistics.median(g['cpu_ms_per_request'] for g in results[mode][p]):.3f} + "
            f"{statistics.median(g['helper_cpu_ms_per_request'] for g in results[mode][p]):.3f}"
            for p in names)
        print(f"| {mode} | " + " | ".join(f"{rates[p]:.0f}" for p in names)
              + f" | **{paired}** | {ratios} | {cpu} | "
              + (f"{arrived[mode]:.1%}" if mode in arrived else "") + " |")


def _spread(values: list[float]) -> str:
    if len(values) < 4:
        return f"{statistics.median(values):.3f}"
    low, middle, high = statistics.quantiles(values, n=4)
    return f"{middle:.3f} ({low:.2f}-{high:.2f})"


def _rate(gateway: dict[str, Any], phase: str) -> float:
    return float(gateway["tokens_per_s"] if "stream" in phase else gateway["rps"])


def _unit(phase: str) -> str:
    return "tokens/s" if "stream" in phase else "req/s"


if __name__ == "__main__":
    main()

"""What OpenTelemetry tracing costs the gateway (issue 27): bench/run.py's "chat c=64" and
"stream c=256" phases with tracing off, on at 100% sampling and on at 1%, in alternating
rounds (each round starting with the next mode), the spans going to a local OTLP/HTTP
endpoint.

    python bench/tracing_overhead.py [--rounds 2] [--seconds 5]

The endpoint reads each export and answers 200 without decoding it (a real collector
runs elsewhere; decoding here would take CPU from the gateway on the same cores); the
exports are decoded after each run, to count the spans that arrived per request (spans
dropped under load would show there). The gateway's numbers are compared, not the ceiling's:
tracing changes nothing at the worker. Not a test: run it on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PHASES = ["chat c=64", "stream c=256"]
MODES = {
    "off": {},
    "on, 100%": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
    "on, 1%": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
               "OTEL_TRACES_SAMPLER_ARG": "0.01"},
}


class Sink:
    """An OTLP/HTTP endpoint that takes every export and keeps only its size."""

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

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> int:
        """The spans of the exports received since the last call (decoded now)."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import \
            ExportTraceServiceRequest

        bodies, self.bodies = self.bodies, []
        count = 0
        for body in bodies:
            request = ExportTraceServiceRequest.FromString(body)
            count += sum(len(scope.spans) for resource in request.resource_spans
                         for scope in resource.scope_spans)
        return count


def run_phases(seconds: float, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--phases", *PHASES, "--capacity",
         "0", "--seconds", str(seconds)], cwd=ROOT, env={**os.environ, **env},
        capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {row["phase"]: row for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    sink = Sink()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        mode: {phase: [] for phase in PHASES} for mode in MODES}
    modes = list(MODES.items())
    for round_number in range(args.rounds):
        # Each round starts with another mode, so that a drift within a round favours
        # none (with "off" always first, the 1% runs, which do almost nothing more,
        # came out 3-7% behind it)
        shift = round_number % len(modes)
        for mode, extra in modes[shift:] + modes[:shift]:
            env = dict(extra)
            if mode != "off":
                env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": sink.url})
            before = sink.posts
            rows = run_phases(args.seconds, env)
            for phase in PHASES:
                results[mode][phase].append(rows[phase]["gateway"])
            # A chat request makes 2 spans (request, upstream attempt), a stream 3 (and
            # the stream); the warm-up requests count.
            expected = sum((3 if "stream" in p else 2) * (rows[p]["gateway"]["requests"]
                                                          + rows[p]["users"]) for p in PHASES)
            arrived = sink.spans()
            print(f"round {round_number + 1}, {mode}: "
                  + ", ".join(f"{p} {_rate(rows[p]['gateway'], p):.0f}" for p in PHASES)
                  + f"; {sink.posts - before} exports, {arrived} spans"
                  + (f" ({arrived / expected:.1%} of the requests' spans)"
                     if mode == "on, 100%" else ""), flush=True)
    print("\n| tracing | " + " | ".join(f"{p} ({_unit(p)})" for p in PHASES)
          + " | vs off (medians) | vs off (median of each round's ratio) | "
          + " | ".join(f"CPU ms/request, {p}: gateway + export helper" for p in PHASES) + " |")
    print("|---|" + "---|" * (len(PHASES) + 2 + len(PHASES)))
    baseline = {p: statistics.median(_rate(g, p) for g in results["off"][p]) for p in PHASES}
    for mode in MODES:
        rates = {p: statistics.median(_rate(g, p) for g in results[mode][p]) for p in PHASES}
        ratios = " / ".join(f"{rates[p] / baseline[p]:.2f}" for p in PHASES)
        paired = " / ".join(
            f"{statistics.median(_rate(on, p) / _rate(off, p) for on, off in zip(results[mode][p], results['off'][p])):.2f}"  # noqa: E501
            for p in PHASES)
        cpu = " | ".join(
            f"{statistics.median(g['cpu_ms_per_request'] for g in results[mode][p]):.2f} + "
            f"{statistics.median(g['helper_cpu_ms_per_request'] for g in results[mode][p]):.2f}"
            for p in PHASES)
        print(f"| {mode} | " + " | ".join(f"{rates[p]:.0f}" for p in PHASES)
              + f" | {ratios} | {paired} | {cpu} |")
    print(f"\n{sink.posts} exports, {sink.bytes / 2**20:.1f} MiB of spans in all")


def _rate(gateway: dict[str, Any], phase: str) -> float:
    return float(gateway["tokens_per_s"] if "stream" in phase else gateway["rps"])


def _unit(phase: str) -> str:
    return "tokens/s" if "stream" in phase else "req/s"


if __name__ == "__main__":
    main()

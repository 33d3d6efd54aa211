"""Soak: minutes of mixed traffic with injected faults, then a leak check.

    python bench/soak.py [--seconds 120] [--users 32]

Starts the controller, three fake workers (tests/fake_worker.py) for one model and the
gateway under gunicorn. Simulated users send chat (stream and not), completions and
embeddings; some ask the workers to fail (error frames, garbage, dropped connections,
stalls, HTTP 500), some send bad input, some hang up mid-stream; every 10 s a worker is
killed with SIGKILL and a new one started. Every request must end in a complete answer
or a well-formed error (the OpenAI envelope, or an error event followed by [DONE] in a
stream). At the end, the gateway must hold no admission place, no more file descriptors
than it started with (plus its pooled connections) and no extra greenlets (beyond the
probes of killed workers). Exits 1 on any violation. Not part of the tests.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import requests  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.conftest import (Server, start_controller, start_fake_worker,  # noqa: E402
                            start_gateway)

MODEL = "soak"
FAULTS = ["", "", "", "", "", "", "[[error:50001]]", "[[error:50002]]", "[[garbage]]",
          "[[drop]]", "[[stall]]", "[[http:500]]", "[[slow:0.05]]"]


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.outcomes: Counter[str] = Counter()
        self.messages: Counter[str] = Counter()  # error texts, to see what failed and why
        self.violations: list[str] = []
        self.workers: list[Server] = []

    def start(self) -> None:
        self.controller = start_controller()
        for _ in range(3):
            self.workers.append(start_fake_worker(self.controller.url, "--models", MODEL))
        # The fake workers answer non-stream requests only when done (as FastChat's do), so
        # a hung one is bounded by the generation timeout.
        self.gateway = start_gateway(self.controller.url, "--read-timeout", "2",
                                     "--first-token-timeout", "3", "--generation-timeout",
                                     "5", "--models-ttl", "1")
        while MODEL not in requests.get(self.gateway.url + "/ready").text:
            time.sleep(0.2)
        time.sleep(1.5)
        self.baseline = self.stats()

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = requests.get(self.gateway.url + "/health?verbose=1").json()
        return stats

    def stop(self) -> None:
        for server in [self.gateway, *self.workers, self.controller]:
            server.stop()

    def chaos(self, deadline: float) -> None:
        while time.monotonic() < deadline - 12:
            gevent.sleep(10)
            victim = random.choice(self.workers)
            victim.process.kill()
            self.workers.remove(victim)
            self.workers.append(start_fake_worker(self.controller.url, "--models", MODEL))
            self.outcomes["workers killed"] += 1

    def user(self, deadline: float) -> None:
        session = requests.Session()
        while time.monotonic() < deadline:
            kind = random.choice(["chat", "stream", "completion", "embeddings", "bad",
                                  "hangup"])
            try:
                self.one(session, kind, random.choice(FAULTS))
            except requests.RequestException as exc:
                self.violations.append(f"{kind}: connection failed: {exc}")
        session.close()

    def one(self, session: requests.Session, kind: str, fault: str) -> None:
        url = self.gateway.url
        messages = [{"role": "user", "content": f"{fault} hello"}]
        if kind == "bad":
            body: Any = random.choice([{"model": MODEL}, {"model": MODEL, "messages": messages,
                                                          "temperature": 9}, "not json"])
            response = session.post(url + "/v1/chat/completions", timeout=30,
                                    **({"data": body} if isinstance(body, str)
                                       else {"json": body}))
            self.check_json(kind, response, expect_error=True)
        elif kind == "embeddings":
            response = session.post(url + "/v1/embeddings", timeout=30,
                                    json={"model": MODEL, "input": ["a", "b", "c", "d", "e"]})
            self.check_json(kind, response)
        elif kind in ("stream", "hangup"):
            response = session.post(url + "/v1/chat/completions", stream=True, timeout=30,
                                    json={"model": MODEL, "stream": True,
                                          "messages": messages})
            if kind == "hangup":
                next(response.iter_content(chunk_size=None), None)
                response.close()
                self.outcomes["hung up mid-stream"] += 1
                return
            self.check_stream(response)
        else:
            path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
            payload = {"model": MODEL, "messages": messages} if kind == "chat" else \
                {"model": MODEL, "prompt": f"{fault} hi", "max_tokens": 8}
            self.check_json(kind, session.post(url + path, json=payload, timeout=30))

    def check_json(self, kind: str, response: requests.Response,
                   expect_error: bool = False) -> None:
        try:
            body = response.json()
        except ValueError:
            self.violations.append(f"{kind}: {response.status_code} not JSON")
            return
        if response.status_code == 200 and not expect_error and \
                ("choices" in body or "data" in body):
            self.outcomes["complete answers"] += 1
        elif response.status_code >= 400 and response.status_code < 500 or \
                response.status_code in (502, 503, 504):
            error = body.get("error") if isinstance(body, dict) else None
            if isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}:
                self.outcomes[f"errors {response.status_code}"] += 1
                self.messages[f"{response.status_code} {error['message'][:60]}"] += 1
            else:
                self.violations.append(f"{kind}: error without envelope: {body}")
        else:
            self.violations.append(f"{kind}: {response.status_code} {str(body)[:200]}")

    def check_stream(self, response: requests.Response) -> None:
        if response.status_code != 200:
            self.check_json("stream", response)
            return
        raw = response.content
        events = [e for e in raw.split(b"\n\n") if e.startswith(b"data:")]
        if not events or events[-1] != b"data: [DONE]":
            self.violations.append(f"stream did not end with [DONE]: {raw[-200:]!r}")
        elif b'"error":' in events[-2]:
            self.outcomes["streams ended by an error event"] += 1
        else:
            self.outcomes["complete streams"] += 1

    def run(self) -> int:
        self.start()
        try:
            deadline = time.monotonic() + self.args.seconds
            crew = [gevent.spawn(self.user, deadline) for _ in range(self.args.users)]
            crew.append(gevent.spawn(self.chaos, deadline))
            gevent.joinall(crew)
            time.sleep(8)  # let timeouts run out and hung-up streams close
            final = self.stats()
            if final["in_flight"] or final["queued"]:
                self.violations.append(f"admission places leaked: {final}")
            if final["fds"] > self.baseline["fds"] + 3 * 8 + 10:
                self.violations.append(f"file descriptors leaked: {self.baseline['fds']} "
                                       f"-> {final['fds']}")
            probes = final["workers_probed"]  # killed workers: probed until they expire
            if final["greenlets"] > self.baseline["greenlets"] + probes + 5:
                self.violations.append(f"greenlets leaked: {self.baseline['greenlets']} -> "
                                       f"{final['greenlets']}")
        finally:
            self.stop()
        total = sum(v for k, v in self.outcomes.items() if k != "workers killed")
        print(json.dumps({"requests": total, "outcomes": dict(self.outcomes),
                          "errors": dict(self.messages.most_common(12)),
                          "violations": len(self.violations),
                          "gateway_before": self.baseline, "gateway_after": final},
                         indent=1))
        for violation in self.violations[:20]:
            print("VIOLATION", violation)
        return 1 if self.violations else 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--users", type=int, default=32)
    sys.exit(Soak(parser.parse_args()).run())


if __name__ == "__main__":
    main()

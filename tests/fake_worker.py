"""A fake FastChat-protocol model worker, served over real HTTP for the tests.

Run: ``python tests/fake_worker.py --controller URL --models a,b [--capabilities ...]``.
It prints ``PORT <n>`` once listening, registers with the controller and heartbeats.

The reply is deterministic: "Hello! I am a fake model." one word per token, unless the last
user text holds a directive:
  [[reply:TEXT]]    reply TEXT instead
  [[count:N]]       reply N words, "w0 w1 ..."
  [[error:CODE]]    an error_code frame after two tokens
  [[hang]]          no byte at all for a long time (before the response headers)
  [[stall]]         two tokens, then a long silence
  [[drop]]          two tokens, then the connection is cut
  [[garbage]]       two tokens, then a frame that is not JSON
  [[http:STATUS]]   answer with that HTTP status and a plain-text body
  [[slow:SECONDS]]  wait that long before each token
  [[multibyte]]     "héllo wörld" with each character's bytes split across frames
Test-only routes: GET /fake/log (recorded requests), POST /fake/reset, GET /fake/stats.

``--limit-worker-concurrency N`` runs at most N generations at once, the rest waiting in
arrival order as FastChat's worker makes them (its semaphore, before the answer's
headers); ``--report-capacity`` says N in /worker_get_status as flaskchat's worker does
(``limit_worker_concurrency``), which a stock FastChat worker does not. /fake/stats then
counts the most generations seen running at once (``peak``).
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson
import requests
from gevent.pywsgi import WSGIServer
from werkzeug.wrappers import Request, Response

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.protocol.frames import encode_frame
from tests.fake_data import DEFAULT_REPLY, TEMPLATES, vector

LONG_WAIT = 3600.0
_DIRECTIVE = re.compile(r"\[\[(\w+)(?::([^\]]*))?\]\]")


class FakeWorker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.models = args.models.split(",")
        self.capabilities = [c for c in args.capabilities.split(",") if c]
        self.log: list[dict[str, Any]] = []
        self.ports: set[str] = set()  # client ports seen: one per TCP connection
        self.active = 0
        self.cancelled = 0
        self.peak = 0  # the most generations running at once
        self.peak_arrived = 0  # the most generation requests in the worker at once
        self._running = 0
        self._arrived = 0
        self._busy_since: list[float] = []
        self._busy_done = 0.0
        self.generations = 0  # generations started
        # gevent's semaphore (monkey-patched) wakes its waiters in arrival order
        self.slots = threading.Semaphore(args.limit_worker_concurrency) \
            if args.limit_worker_concurrency else None
        self.lock = threading.Lock()
        self.routes: dict[str, Callable[[Request], Response]] = {
            "/worker_generate_stream": self.generate_stream,
            "/worker_generate": self.generate,
            "/worker_get_embeddings": self.embeddings,
            "/count_token": self.count_token,
            "/model_details": self.model_details,
            "/worker_get_conv_template": self.conv_template,
            "/worker_get_status": self.status,
            "/fake/log": self.fake_log,
            "/fake/reset": self.fake_reset,
            "/fake/stats": self.fake_stats,
        }

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        handler = self.routes.get(request.path)
        if handler is None:
            return Response("Not Found", status=404)(environ, start_response)
        body = request.get_json(silent=True) if request.method == "POST" else None
        if not request.path.startswith("/fake/"):
            with self.lock:
                self.ports.add(f"{environ.get('REMOTE_ADDR')}:{environ.get('REMOTE_PORT')}")
                self.log.append({"path": request.path, "body": body,
                                 "request_id": request.headers.get("X-Request-Id")})
        request.environ["fake.body"] = body or {}
        return handler(request)(environ, start_response)

    # ---- generation -------------------------------------------------------------------

    def _plan(self, params: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        text = _last_user_text(params)
        directives = {m.group(1): m.group(2) or "" for m in _DIRECTIVE.finditer(text)}
        reply = directives.get("reply") or DEFAULT_REPLY
        if "count" in directives:
            reply = " ".join(f"w{i}" for i in range(int(directives["count"])))
        if "multibyte" in directives:
            reply = "héllo wörld"
        tokens = re.findall(r"\S+\s*|\s+", reply) if "multibyte" not in directives \
            else list(reply)
        return tokens, directives

    def _frames(self, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        tokens, directives = self._plan(params)
        prompt = str(params.get("prompt", ""))
        prompt_tokens = _count(prompt)
        max_new = int(params.get("max_new_tokens") or 256)
        stops = params.get("stop") or []
        if isinstance(stops, str):
            stops = [stops]
        prefix = prompt if params.get("echo") else ""
        out = ""
        delay = float(directives.get("slow") or self.args.delay)
        finish = "stop"
        for i, token in enumerate(tokens):
            if i >= max_new:
                finish = "length"
                break
            if delay:
                time.sleep(delay)
            if i == 2:
                yield from self._mid_stream_fault(directives)
            if "multibyte" in directives:
                yield self._frame(prefix + out + "\ufffd", prompt_tokens, i, None)
            out += token
            cut = _cut(out, stops) if not self.args.ignore_stop else None
            if cut is not None:
                out = cut
                break
            yield self._frame(prefix + out, prompt_tokens, i + 1, None, params)
        generated = min(len(tokens), max_new)
        yield self._frame(prefix + out, prompt_tokens, generated, finish, params)

    def _mid_stream_fault(self, directives: dict[str, str]) -> Iterator[dict[str, Any]]:
        if "error" in directives:
            yield {"text": "**NETWORK ERROR DUE TO HIGH TRAFFIC.**\n\n(fake failure)",
                   "error_code": int(directives["error"] or 50001)}
            raise _Stop()
        if "stall" in directives:
            time.sleep(LONG_WAIT)
        if "drop" in directives:
            raise ConnectionAbortedError("fake worker drops the connection")
        if "garbage" in directives:
            yield {"__garbage__": True}

    def _frame(self, text: str, prompt_tokens: int, generated: int, finish: str | None,
               params: dict[str, Any] | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {
            "text": text, "error_code": 0,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                      "total_tokens": prompt_tokens + generated},
            "finish_reason": finish, "logprobs": None}
        if params is not None and params.get("logprobs") is not None:
            words = re.findall(r"\S+\s*", text)
            frame["logprobs"] = {"text_offset": [0] * len(words), "tokens": words,
                                 "token_logprobs": [-0.5] * len(words),
                                 "top_logprobs": [{} for _ in words]}
        return frame

    def generate_stream(self, request: Request) -> Response:
        params = request.environ["fake.body"]
        _, directives = self._plan(params)
        if "http" in directives:
            return Response("Internal Server Error", status=int(directives["http"] or 500))
        if "hang" in directives:
            time.sleep(LONG_WAIT)

        def body() -> Iterator[bytes]:
            with self.lock:
                self.active += 1
            finished = False
            try:
                for frame in self._frames(params):
                    if frame.get("__garbage__"):
                        yield b"{not json\0"
                        continue
                    yield encode_frame(frame)
                finished = True
            except _Stop:
                finished = True
            finally:
                with self.lock:
                    self.active -= 1
                    if not finished:
                        self.cancelled += 1

        def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
            self._take_slot()
            write = start_response("200 OK", [("Content-Type", "application/octet-stream")])
            write(b"")  # headers now, as FastChat's worker (Starlette) sends them
            return self._holding_slot(body())
        return app  # type: ignore[return-value]

    def generate(self, request: Request) -> Response:
        params = request.environ["fake.body"]
        _, directives = self._plan(params)
        if "http" in directives:
            return Response("Internal Server Error", status=int(directives["http"] or 500))
        if "hang" in directives or "stall" in directives:
            time.sleep(LONG_WAIT)
        if "garbage" in directives:
            return Response(b"{not json", mimetype="application/json")
        if self.capabilities:  # like flaskchat's worker: headers at once, then whitespace
            def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
                self._take_slot()
                start_response("200 OK", [("Content-Type", "application/json")])
                return self._holding_slot(self._spaced(params))
            return app  # type: ignore[return-value]
        self._take_slot()
        try:
            return _json(self._last_frame(params))
        finally:
            self._give_slot()

    def _take_slot(self) -> None:
        with self.lock:
            self._arrived += 1
            self.peak_arrived = max(self.peak_arrived, self._arrived)
        if self.slots is not None:
            self.slots.acquire()
        with self.lock:
            self.generations += 1
            self._running += 1
            self.peak = max(self.peak, self._running)
            self._busy_since.append(time.monotonic())

    def _give_slot(self) -> None:
        with self.lock:
            self._running -= 1
            self._arrived -= 1
            self._busy_done += time.monotonic() - self._busy_since.pop(0)
        if self.slots is not None:
            self.slots.release()

    def busy_seconds(self) -> float:
        """Generation-seconds so far (two generations for a second: two), running ones
        included."""
        now = time.monotonic()
        return self._busy_done + sum(now - began for began in self._busy_since)

    def _holding_slot(self, body: Iterator[bytes]) -> Iterator[bytes]:
        try:
            yield from body
        finally:
            self._give_slot()

    def _last_frame(self, params: dict[str, Any]) -> dict[str, Any]:
        last: dict[str, Any] = {}
        try:
            for frame in self._frames(params):
                last = frame
                if frame.get("error_code"):
                    break
        except _Stop:
            pass
        return last

    def _spaced(self, params: dict[str, Any]) -> Iterator[bytes]:
        """Whitespace while it generates: with generate_progress a space per token (a
        newline first), else a space per token as a bare keep-alive."""
        with self.lock:
            self.active += 1
        finished = False
        last: dict[str, Any] = {}
        try:
            yield b"\n" if "generate_progress" in self.capabilities else b" "
            try:
                for frame in self._frames(params):
                    last = frame
                    if frame.get("error_code"):
                        break
                    yield b" "
            except _Stop:
                pass
            finished = True
            yield orjson.dumps(last)
        finally:
            with self.lock:
                self.active -= 1
                if not finished:
                    self.cancelled += 1

    # ---- the small endpoints --------------------------------------------------------

    def embeddings(self, request: Request) -> Response:
        params = request.environ["fake.body"]
        inputs = params.get("input") or []
        if any("[[error" in text for text in inputs):
            return _json({"text": "fake embedding failure", "error_code": 50001})
        vectors = [vector(text, self.args.embedding_dim) for text in inputs]
        return _json({"embedding": vectors, "token_num": sum(_count(t) for t in inputs)})

    def count_token(self, request: Request) -> Response:
        prompt = str(request.environ["fake.body"].get("prompt", ""))
        return _json({"count": _count(prompt), "error_code": 0})

    def model_details(self, request: Request) -> Response:
        details: dict[str, Any] = {"context_length": self.args.context_length}
        if self.capabilities:
            details["capabilities"] = self.capabilities
        return _json(details)

    def conv_template(self, request: Request) -> Response:
        return _json({"conv": TEMPLATES[self.args.conv_template]})

    def status(self, request: Request | None = None) -> Response:
        return _json(self.status_dict())

    def status_dict(self) -> dict[str, Any]:
        status: dict[str, Any] = {"model_names": self.models, "speed": 1,
                                  "queue_length": self.active}
        if self.args.report_capacity:
            status["limit_worker_concurrency"] = self.args.limit_worker_concurrency
        return status

    def fake_log(self, request: Request) -> Response:
        return _json(self.log)

    def fake_reset(self, request: Request) -> Response:
        with self.lock:
            self.log.clear()
            self.ports.clear()
            self.cancelled = 0
            self.peak = self._running
            self.peak_arrived = self._arrived
            self.generations = 0
        return _json({"ok": True})

    def fake_stats(self, request: Request) -> Response:
        with self.lock:
            return _json({"connections": len(self.ports), "active": self.active,
                          "cancelled": self.cancelled, "requests": len(self.log),
                          "running": self._running, "peak": self.peak,
                          "peak_arrived": self.peak_arrived,
                          "generations": self.generations, "busy": self.busy_seconds()})


class _Stop(Exception):
    """Ends a stream right after an error frame."""


def _last_user_text(params: dict[str, Any]) -> str:
    messages = params.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if message.get("role") == "user":
                return str(message.get("content") or "")
    return str(params.get("prompt", ""))


def _count(text: str) -> int:
    return len(text.split()) + 1  # words, plus a BOS token


def _cut(text: str, stops: list[str]) -> str | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return text[:min(positions)] if positions else None


def _json(payload: Any) -> Response:
    return Response(orjson.dumps(payload), mimetype="application/json")


def _register(worker: FakeWorker, address: str) -> None:
    requests.post(worker.args.controller + "/register_worker", json={
        "worker_name": address, "check_heart_beat": True,
        "worker_status": worker.status_dict(), "multimodal": worker.args.multimodal},
        timeout=5).raise_for_status()


def _heartbeat_forever(worker: FakeWorker, address: str) -> None:
    while True:
        time.sleep(worker.args.heartbeat)
        try:
            answer = requests.post(worker.args.controller + "/receive_heart_beat", json={
                "worker_name": address, "queue_length": worker.active}, timeout=5).json()
            if not answer.get("exist"):
                _register(worker, address)
        except requests.RequestException:
            pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--controller", default="")
    parser.add_argument("--models", default="fake-model")
    parser.add_argument("--capabilities", default="", help="e.g. length_check,messages")
    parser.add_argument("--conv-template", default="vicuna_v1.1", choices=sorted(TEMPLATES))
    parser.add_argument("--context-length", type=int, default=2048)
    parser.add_argument("--embedding-dim", type=int, default=8)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--heartbeat", type=float, default=2.0)
    parser.add_argument("--ignore-stop", action="store_true")
    parser.add_argument("--multimodal", action="store_true")
    parser.add_argument("--limit-worker-concurrency", type=int, default=0)
    parser.add_argument("--report-capacity", action="store_true")
    args = parser.parse_args()
    worker = FakeWorker(args)
    # gevent's pywsgi keeps connections alive, as uvicorn does for FastChat's workers
    # (werkzeug's server closes every connection).
    server = WSGIServer(("127.0.0.1", 0), worker, log=None)
    server.init_socket()
    address = f"http://127.0.0.1:{server.server_port}"
    if args.controller:
        _register(worker, address)
        threading.Thread(target=_heartbeat_forever, args=(worker, address), daemon=True).start()
    print(f"PORT {server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

"""A fast fake model worker for the benchmarks: FastChat's worker protocol at the least cost.

gevent's pywsgi with keep-alive and TCP_NODELAY, raw WSGI, frames prepared once: a reply is
32 tokens (" tok0 tok1 ..."), with an optional delay per token, and embeddings are 384
floats. It counts requests per path and accepted TCP connections (GET /bench/stats, POST
/bench/reset), so the harness can report backend calls and new connections per request.

    python bench/fast_worker.py --port 0 [--delay 0] [--stock] [--controller URL]

A prompt holding [[delay:S]] or [[tokens:N]] overrides the delay or reply length.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any, Callable, Iterator  # noqa: E402

import gevent  # noqa: E402
import orjson  # noqa: E402
import requests  # noqa: E402
from gevent.pywsgi import WSGIHandler, WSGIServer  # noqa: E402

TOKENS = 32
DIM = 384
_DIRECTIVE = re.compile(rb"\[\[(delay|tokens):([0-9.]+)\]\]")
JSON = [("Content-Type", "application/json")]


def frames(count: int, prompt_tokens: int = 8) -> list[bytes]:
    out, text = [], ""
    for i in range(count):
        text += f" tok{i}"
        last = i == count - 1
        out.append(orjson.dumps({
            "text": text, "error_code": 0,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": i + 1,
                      "total_tokens": prompt_tokens + i + 1},
            "finish_reason": "length" if last else None, "logprobs": None}) + b"\0")
    return out


def openai_stream(model: str, count: int) -> list[bytes]:
    """An OpenAI-compatible server's stream of ``count`` tokens, an event per write."""
    head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1,
            "model": model}
    events = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}]
    events += [{**head, "choices": [{"index": 0, "delta": {"content": f" tok{i}"},
                                     "finish_reason": None}]} for i in range(count)]
    events.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def openai_completion(model: str, count: int) -> bytes:
    return orjson.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(
            f" tok{i}" for i in range(count))}, "finish_reason": "length", "logprobs": None}],
        "usage": {"prompt_tokens": 8, "completion_tokens": count, "total_tokens": 8 + count}})


class FastWorker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.frames = frames(TOKENS)
        self.final = self.frames[-1][:-1]
        self.embedding = [round(((i * 37) % 101 - 50) / 290.0, 6) for i in range(DIM)]
        # Also an OpenAI-compatible server (POST /v1/chat/completions) for the relay phases.
        self.openai_events = openai_stream(args.relay_model, TOKENS)
        self.openai_answer = openai_completion(args.relay_model, TOKENS)
        self.calls: Counter[str] = Counter()
        self.connections = 0
        details: dict[str, Any] = {"context_length": 4096}
        if not args.stock:
            details["capabilities"] = ["length_check"]
        self.fixed: dict[str, bytes] = {
            "/model_details": orjson.dumps(details),
            "/count_token": orjson.dumps({"count": 8, "error_code": 0}),
            "/worker_get_status": orjson.dumps({"model_names": [args.model], "speed": 1,
                                                "queue_length": 0}),
            "/worker_get_conv_template": orjson.dumps({"conv": {
                "name": "zero_shot", "system_template": "{system_message}",
                "system_message": "", "roles": ["Human", "Assistant"], "messages": [],
                "offset": 0, "sep_style": 1, "sep": "\n### ", "sep2": None,
                "stop_str": None, "stop_token_ids": None}}),
        }

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ["PATH_INFO"]
        if path.startswith("/bench/"):
            return self.bench(path, start_response)
        self.calls[path] += 1
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        fixed = self.fixed.get(path)
        if fixed is not None:
            start_response("200 OK", JSON)
            return [fixed]
        delay, count = self.args.delay, TOKENS
        if b"[[" in body:
            for name, value in _DIRECTIVE.findall(body):
                if name == b"delay":
                    delay = float(value)
                else:
                    count = int(value)
        if path == "/worker_generate_stream":
            start_response("200 OK", [])
            return self.stream(delay, count)
        if path == "/worker_generate":
            if delay:
                gevent.sleep(delay * count)
            start_response("200 OK", JSON)
            return [self.final if count == TOKENS else frames(count)[-1][:-1]]
        if path == "/v1/chat/completions":
            if b'"stream":true' in body:
                start_response("200 OK", [("Content-Type", "text/event-stream")])
                return iter(self.openai_events)  # chunked, an event per chunk
            start_response("200 OK", JSON)
            return [self.openai_answer]
        if path == "/worker_get_embeddings":
            inputs = orjson.loads(body).get("input") or []
            start_response("200 OK", JSON)
            return [orjson.dumps({"embedding": [self.embedding] * len(inputs),
                                  "token_num": 4 * len(inputs)})]
        start_response("404 Not Found", [])
        return [b"not found"]

    def stream(self, delay: float, count: int) -> Iterator[bytes]:
        for frame in (self.frames if count == TOKENS else frames(count)):
            if delay:
                gevent.sleep(delay)
            yield frame

    def bench(self, path: str, start_response: Callable[..., Any]) -> list[bytes]:
        if path == "/bench/reset":
            self.calls.clear()
            self.connections = 0
        start_response("200 OK", JSON)
        return [orjson.dumps({"calls": dict(self.calls), "connections": self.connections})]


class _NoDelayHandler(WSGIHandler):  # type: ignore[misc]
    def __init__(self, sock: socket.socket, address: Any, server: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server.application.connections += 1
        super().__init__(sock, address, server)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="bench-model")
    parser.add_argument("--relay-model", default="relay-model",
                        help="the model name its OpenAI-compatible endpoint answers with")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--stock", action="store_true",
                        help="no capabilities: the gateway counts tokens first")
    parser.add_argument("--controller", default="")
    args = parser.parse_args()
    app = FastWorker(args)
    server = WSGIServer(("127.0.0.1", args.port), app, log=None, handler_class=_NoDelayHandler,
                        backlog=4096)
    server.init_socket()
    address = f"http://127.0.0.1:{server.server_port}"
    if args.controller:
        requests.post(args.controller + "/register_worker", json={
            "worker_name": address, "check_heart_beat": False,
            "worker_status": {"model_names": [args.model], "speed": 1, "queue_length": 0}},
            timeout=5).raise_for_status()
    print(f"PORT {server.server_port}", flush=True)
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()

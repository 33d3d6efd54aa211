"""A fake OpenAI-compatible server (as vLLM, llama.cpp's server or Ollama would be), served
over real HTTP for the tests.

Run: ``python tests/fake_openai.py --models upstream-name[,other] [--api-key KEY]
[--spaced] [--no-usage]``; prints ``PORT <n>`` once listening. ``--spaced`` writes JSON with
spaces after colons (as Python's json module and some servers do); ``--no-usage`` never
reports usage (it ignores ``stream_options.include_usage``, as some servers do).

Replies "Hi from NAME." word by word (NAME: the --name flag), unless the last user text
holds a directive:
  [[reply:TEXT]]    reply TEXT
  [[count:N]]       reply N words, "w0 w1 ..."
  [[usage:N]]       report N completion tokens, whatever it sent
  [[slow:SECONDS]]  wait that long before each chunk
  [[http:STATUS]]   answer with that status and an OpenAI error envelope
  [[hang]]          no byte for a long time
  [[late]]          non-stream: the headers at once, the answer after a long time
  [[drop]]          two chunks, then the connection is cut
  [[error]]         two chunks, then an error event (as vLLM sends)
  [[nodone]]        end the stream without [DONE] or a finish_reason
With ``tools`` it answers with a call of the first tool, unless the last message is a tool
result: then it replies "The tool said: RESULT." (as a model that used it would); with a
json response_format, a JSON object. Test-only routes: GET /fake/log, POST /fake/reset,
GET /fake/stats.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse
import json
import re
import threading
import time
from typing import Any, Iterator

import orjson
from gevent.pywsgi import WSGIServer
from werkzeug.wrappers import Request, Response

_DIRECTIVE = re.compile(r"\[\[(\w+)(?::([^\]]*))?\]\]")


def _tool_result(body: dict[str, Any]) -> str | None:
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "tool":
        return str(messages[-1].get("content"))
    return None


def _calls_tool(body: dict[str, Any]) -> bool:
    return bool(body.get("tools")) and body.get("tool_choice") != "none" \
        and _tool_result(body) is None


LONG_WAIT = 3600.0


class FakeOpenAI:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.models = args.models.split(",")
        self.log: list[dict[str, Any]] = []
        self.ports: set[str] = set()  # client ports seen: one per TCP connection
        self.cancelled = 0
        self.lock = threading.Lock()

    def dumps(self, value: Any) -> bytes:
        if self.args.spaced:
            return json.dumps(value).encode()
        return orjson.dumps(value)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        response = self.route(request)
        return response(environ, start_response)

    def route(self, request: Request) -> Response:
        path = request.path
        if path == "/fake/log":
            return self.json(self.log)
        if path == "/fake/reset":
            with self.lock:
                self.log.clear()
                self.ports.clear()
                self.cancelled = 0
            return self.json({"ok": True})
        if path == "/fake/stats":
            return self.json({"cancelled": self.cancelled, "requests": len(self.log),
                              "connections": len(self.ports)})
        if self.args.api_key and request.headers.get("Authorization") != \
                f"Bearer {self.args.api_key}":
            return self.error(401, "Incorrect API key provided.", "invalid_api_key")
        if path == "/v1/models" and request.method == "GET":
            return self.json({"object": "list", "data": [
                {"id": m, "object": "model", "owned_by": "fake"} for m in self.models]})
        body = request.get_json(silent=True) or {}
        with self.lock:
            self.ports.add(f"{request.environ.get('REMOTE_ADDR')}:"
                           f"{request.environ.get('REMOTE_PORT')}")
            self.log.append({"path": path, "body": body,
                             "request_id": request.headers.get("X-Request-ID"),
                             "authorization": request.headers.get("Authorization"),
                             "traceparent": request.headers.get("traceparent")})
        if path not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            return self.error(404, f"no route {path}")
        if body.get("model") not in self.models:
            return self.error(404, f"The model `{body.get('model')}` does not exist.",
                              "model_not_found")
        if path == "/v1/embeddings":
            return self.embeddings(body)
        directives = _directives(body)
        if "http" in directives:
            status = int(directives["http"])
            return self.error(status, f"fake failure {status}", param="messages"
                              if status == 400 else None)
        if "hang" in directives:
            time.sleep(LONG_WAIT)
        if body.get("temperature", 1) == 1.5:  # a rule this upstream has and we do not
            return self.error(400, "temperature 1.5 is not supported here", param="temperature")
        if body.get("stream"):
            return Response(self.stream(path, body, directives),
                            content_type="text/event-stream")
        if "late" in directives:
            return Response(self.late(self.complete(path, body, directives)),
                            content_type="application/json")
        return self.json(self.complete(path, body, directives))

    def late(self, answer: dict[str, Any]) -> Iterator[bytes]:
        yield b" "  # the headers go out with it
        try:
            time.sleep(LONG_WAIT)
            yield self.dumps(answer)
        except GeneratorExit:
            with self.lock:
                self.cancelled += 1
            raise

    # ---- answers ----------------------------------------------------------------------

    def words(self, directives: dict[str, str], body: dict[str, Any] | None = None
              ) -> list[str]:
        if "count" in directives:
            return [f"w{i} " for i in range(int(directives["count"]))]
        result = _tool_result(body or {})
        text = directives.get("reply") or (f"The tool said: {result}." if result is not None
                                           else f"Hi from {self.args.name}.")
        return re.findall(r"\S+\s*", text)

    def complete(self, path: str, body: dict[str, Any],
                 directives: dict[str, str]) -> dict[str, Any]:
        words = self.words(directives, body)
        made = int(directives.get("usage") or len(words))
        usage: dict[str, int] | None = {"prompt_tokens": 7, "completion_tokens": made,
                                        "total_tokens": 7 + made}
        if self.args.no_usage:
            usage = None
        if path == "/v1/completions":
            return {"id": "cmpl-fake", "object": "text_completion", "created": 1,
                    "model": body["model"], "usage": usage, "choices": [
                        {"index": 0, "text": "".join(words), "finish_reason": "stop",
                         "logprobs": None}]}
        message: dict[str, Any] = {"role": "assistant", "content": "".join(words)}
        finish = "stop"
        if _calls_tool(body):
            tool = body["tools"][0]["function"]["name"]
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_fake1", "type": "function",
                 "function": {"name": tool, "arguments": '{"city": "Paris"}'}}]}
            finish = "tool_calls"
        elif (body.get("response_format") or {}).get("type") in ("json_object", "json_schema"):
            message["content"] = '{"answer": "Paris"}'
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
        if body.get("logprobs"):
            choice["logprobs"] = {"content": [
                {"token": w, "logprob": -0.5, "bytes": list(w.encode()),
                 "top_logprobs": [{"token": w, "logprob": -0.5, "bytes": list(w.encode())}]
                 * int(body.get("top_logprobs") or 0)} for w in words]}
        else:
            choice["logprobs"] = None
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1,
                "model": body["model"], "choices": [choice], "usage": usage,
                "system_fingerprint": f"seed-{body.get('seed')}"}

    def stream(self, path: str, body: dict[str, Any],
               directives: dict[str, str]) -> Iterator[bytes]:
        words = self.words(directives, body)
        delay = float(directives.get("slow") or 0)
        chat = path == "/v1/chat/completions"
        base = {"id": "chatcmpl-fake" if chat else "cmpl-fake",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": 1, "model": body["model"]}
        usage_on = bool((body.get("stream_options") or {}).get("include_usage")) \
            and not self.args.no_usage
        sent = 0
        try:
            if chat:
                yield self.event({**base, "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""},
                     "finish_reason": None}]})
            yield b": upstream keep-alive comment\n\n"
            if chat and _calls_tool(body):
                name = body["tools"][0]["function"]["name"]
                yield self.event({**base, "choices": [{"index": 0, "delta": {"tool_calls": [
                    {"index": 0, "id": "call_fake1", "type": "function",
                     "function": {"name": name, "arguments": ""}}]}, "finish_reason": None}]})
                yield self.event({**base, "choices": [{"index": 0, "delta": {"tool_calls": [
                    {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]},
                    "finish_reason": None}]})
                finish = "tool_calls"
            else:
                for word in words:
                    if delay:
                        time.sleep(delay)
                    if sent == 2 and "drop" in directives:
                        raise ConnectionAbortedError("fake upstream drops the connection")
                    if sent == 2 and "error" in directives:
                        yield self.event({"error": {"object": "error", "message":
                                                    "the engine died", "type": "InternalError",
                                                    "param": None, "code": 500}})
                        yield b"data: [DONE]\n\n"
                        return
                    delta = {"content": word} if chat else None
                    choice = {"index": 0, "delta": delta, "finish_reason": None} if chat \
                        else {"index": 0, "text": word, "finish_reason": None}
                    yield self.event({**base, "choices": [choice]})
                    sent += 1
                finish = "stop"
            if "nodone" in directives:
                return
            last = {"index": 0, "delta": {}, "finish_reason": finish} if chat \
                else {"index": 0, "text": "", "finish_reason": finish}
            yield self.event({**base, "choices": [last]})
            if usage_on:
                made = int(directives.get("usage") or sent)
                yield self.event({**base, "choices": [], "usage": {
                    "prompt_tokens": 7, "completion_tokens": made,
                    "total_tokens": 7 + made}})
            yield b"data: [DONE]\n\n"
        except GeneratorExit:
            with self.lock:
                self.cancelled += 1
            raise

    def embeddings(self, body: dict[str, Any]) -> Response:
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        data = [{"object": "embedding", "index": i, "embedding": [0.25, -0.5, float(i)]}
                for i in range(len(items))]
        return self.json({"object": "list", "data": data, "model": body["model"],
                          "usage": {"prompt_tokens": 3 * len(items),
                                    "total_tokens": 3 * len(items)}})

    # ---- plumbing ---------------------------------------------------------------------

    def event(self, payload: Any) -> bytes:
        return b"data: " + self.dumps(payload) + b"\n\n"

    def json(self, payload: Any, status: int = 200) -> Response:
        return Response(self.dumps(payload), status=status, content_type="application/json")

    def error(self, status: int, message: str, code: str | None = None,
              param: str | None = None) -> Response:
        return self.json({"error": {"message": message, "type": "invalid_request_error",
                                    "param": param, "code": code}}, status)


def _directives(body: dict[str, Any]) -> dict[str, str]:
    text = ""
    for message in body.get("messages") or []:
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            text = message["content"]
    if isinstance(body.get("prompt"), str):
        text = body["prompt"]
    return {m.group(1): m.group(2) or "" for m in _DIRECTIVE.finditer(text)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", required=True)
    parser.add_argument("--name", default="upstream")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--spaced", action="store_true")
    parser.add_argument("--no-usage", action="store_true")
    args = parser.parse_args()
    server = WSGIServer(("127.0.0.1", 0), FakeOpenAI(args), log=None, error_log=None)
    server.init_socket()
    print(f"PORT {server.socket.getsockname()[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

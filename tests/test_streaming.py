"""SSE details over raw HTTP: headers, chunk fields, keepalive, mid-stream failures,
client disconnects, multibyte text."""
from __future__ import annotations

import socket
import time
from typing import Any

import openai
import orjson
import pytest
import requests

from tests.conftest import API_KEY, MakeClient, Stack

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def stream_events(stack: Stack, content: str, model: str = "vicuna-stock",
                  path: str = "/v1/chat/completions", **extra: Any) -> tuple[
                      requests.Response, list[bytes]]:
    body: dict[str, Any] = {"model": model, "stream": True, **extra}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": content}]
    else:
        body["prompt"] = content
    response = requests.post(stack.gateway.url + path, headers=AUTH, json=body, stream=True,
                             timeout=30)
    raw = b"".join(response.iter_content(chunk_size=None))
    return response, [e for e in raw.split(b"\n\n") if e]


def data_of(events: list[bytes]) -> list[Any]:
    return [orjson.loads(e[6:]) for e in events if e.startswith(b"data: {")]


def test_headers_and_chunk_fields(stack: Stack) -> None:
    response, events = stream_events(stack, "Hi")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["X-Request-ID"]
    assert "gateway;dur=" in response.headers["Server-Timing"]
    assert events[-1] == b"data: [DONE]"
    chunks = data_of(events)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for chunk in chunks:
        assert {"id", "object", "created", "model", "choices"} <= set(chunk)
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["id"] == chunks[0]["id"] and chunk["created"] == chunks[0]["created"]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "stop"}


def test_completion_chunks_have_created(stack: Stack) -> None:
    _, events = stream_events(stack, "x", path="/v1/completions", max_tokens=2)
    chunks = data_of(events)
    assert all(c["object"] == "text_completion" and c["created"] > 0 for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello! I "
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_keepalive_comment_while_waiting_for_the_first_token(stack: Stack) -> None:
    _, events = stream_events(stack, "[[slow:1.2]] hi", max_tokens=1)
    first_data = next(i for i, e in enumerate(events) if e.startswith(b"data:"))
    assert events[first_data].find(b'"role":"assistant"') > 0
    assert b": keepalive" in events[first_data + 1:first_data + 4]
    assert data_of(events)[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("directive, message", [
    ("[[error:50001]]", "fake failure"),
    ("[[error:50002]]", "fake failure"),
    ("[[drop]]", "closed the connection"),
    ("[[garbage]]", "malformed stream"),
    ("[[stall]]", "did not answer in time"),
])
def test_mid_stream_failure_is_an_error_event_then_done(stack: Stack, directive: str,
                                                        message: str) -> None:
    started = time.monotonic()
    response, events = stream_events(stack, directive)
    assert response.status_code == 200
    assert events[-1] == b"data: [DONE]"
    last = orjson.loads(events[-2][6:])
    assert set(last) >= {"error"} and message in last["error"]["message"]
    assert last["error"]["type"] == "server_error"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in data_of(events)[:-1])
    assert text == "Hello! I "
    assert time.monotonic() - started < 15


def test_openai_client_raises_on_an_error_event(stack: Stack, clients: MakeClient) -> None:
    client = clients(stack.base_url, API_KEY)
    stream = client.chat.completions.create(
        model="vicuna-stock", stream=True,
        messages=[{"role": "user", "content": "[[error:50001]]"}])
    with pytest.raises(openai.APIError, match="fake failure"):
        for _ in stream:
            pass


def test_multibyte_characters_split_across_frames(stack: Stack) -> None:
    _, events = stream_events(stack, "[[multibyte]]")
    deltas = [c["choices"][0]["delta"].get("content", "") for c in data_of(events)]
    assert "".join(deltas) == "héllo wörld"
    assert not any("\ufffd" in d for d in deltas)


def test_client_disconnect_closes_the_worker_stream(stack: Stack) -> None:
    model = "qwen-stock"
    stack.reset_worker(model)
    body = orjson.dumps({"model": model, "stream": True, "messages": [
        {"role": "user", "content": "[[slow:0.3]][[reply:a b c d e f g h i j k l m n o]]"}]})
    host, port = stack.gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while b'"content":"a ' not in received:
            received += sock.recv(4096)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stats = stack.worker_stats(model)
        if stats["cancelled"] == 1 and stats["active"] == 0:
            break
        time.sleep(0.1)
    assert stats["cancelled"] == 1 and stats["active"] == 0

"""The gateway behind a real nginx configured with the site file docs/deploy.md gives
operators (see tests/nginx.py): streams arrive chunk by chunk, non-stream requests, errors
and request ids pass through."""
from __future__ import annotations

import time
from typing import Any, Iterator

import pytest
import requests

from tests.conftest import MakeClient, Server, start_controller, start_fake_worker, start_gateway
from tests.nginx import running_nginx


@pytest.fixture(scope="module")
def behind_nginx() -> Iterator[tuple[str, Server]]:
    started: list[Server] = []
    try:
        controller = start_controller()
        started.append(controller)
        started.append(start_fake_worker(controller.url, "--models", "proxied"))
        gateway = start_gateway(controller.url, "--workers", "2")
        started.append(gateway)
        with running_nginx([int(gateway.url.rsplit(":", 1)[1])]) as url:
            yield url, gateway
    finally:
        for server in reversed(started):
            server.stop()


def test_stream_arrives_incrementally(behind_nginx: tuple[str, Server]) -> None:
    url, _ = behind_nginx
    words = "a b c d e f g h"
    started = time.monotonic()
    response = requests.post(url + "/v1/chat/completions", stream=True, timeout=30, json={
        "model": "proxied", "stream": True,
        "messages": [{"role": "user", "content": f"[[slow:0.25]][[reply:{words}]]"}]})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    arrivals: list[tuple[float, bytes]] = []
    for chunk in response.iter_content(chunk_size=None):
        arrivals.append((time.monotonic() - started, chunk))
    body = b"".join(chunk for _, chunk in arrivals)
    assert body.rstrip().endswith(b"data: [DONE]")
    first_text = next(t for t, chunk in arrivals if b'"content":"a' in chunk)
    last = arrivals[-1][0]
    # 8 tokens 0.25 s apart: the first must arrive long before the last is generated.
    print(f"\nbehind nginx: first token at {first_text:.2f} s, last byte at {last:.2f} s, "
          f"{len(arrivals)} reads")
    assert last - first_text > 1.0
    assert len(arrivals) >= 6


def test_openai_client_through_nginx(behind_nginx: tuple[str, Server],
                                     clients: MakeClient) -> None:
    url, _ = behind_nginx
    client = clients(url + "/v1")
    completion = client.chat.completions.create(
        model="proxied", messages=[{"role": "user", "content": "[[reply:through the proxy]]"}])
    assert completion.choices[0].message.content == "through the proxy"
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="proxied", stream=True,
        messages=[{"role": "user", "content": "[[reply:one two three]]"}]) if c.choices]
    assert "".join(p for p in pieces if p) == "one two three"


def test_errors_and_request_id_pass_through(behind_nginx: tuple[str, Server]) -> None:
    url, _ = behind_nginx
    body: dict[str, Any] = {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}
    missing = requests.post(url + "/v1/chat/completions", timeout=10, json=body,
                            headers={"X-Request-ID": "through-nginx-1"})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    assert missing.headers["X-Request-ID"] == "through-nginx-1"
    bad = requests.post(url + "/v1/chat/completions", data=b"{", timeout=10,
                        headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"

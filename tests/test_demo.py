"""The demo page in a real browser (headless chromium via Playwright) against the gateway
under gunicorn (2 gevent workers, so a ticket is often redeemed by the other worker), our
controller and a fake worker over real HTTP."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from tests.browser import launch, new_page
from tests.conftest import Server, start_controller, start_fake_worker, start_gateway

KEY = "demo-key-8d1f3c"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
REPLY = "Streaming into the browser works."


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Server]]:
    started: list[Server] = []
    try:
        controller = start_controller()
        started.append(controller)
        worker = start_fake_worker(controller.url, "--models", "demo-model")
        started.append(worker)
        secured = start_gateway(controller.url, "--workers", "2", "--api-keys", KEY)
        started.append(secured)
        open_gateway = start_gateway(controller.url, "--workers", "1")
        started.append(open_gateway)
        yield {"controller": controller, "worker": worker, "secured": secured,
               "open": open_gateway}
    finally:
        for server in reversed(started):
            server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch()


@pytest.fixture()
def page(browser: Any) -> Iterator[Any]:
    yield from new_page(browser)


def open_demo(page: Any, gateway: Server, key: str | None) -> None:
    page.goto(gateway.url + "/demo")
    if key is not None:
        page.wait_for_selector("#key-panel:not([hidden])")
        page.fill("#key", key)
        page.click("#save-key")
    page.wait_for_selector("#model option[value='demo-model']", state="attached")
    page.select_option("#model", "demo-model")


def send(page: Any, text: str) -> None:
    page.fill("#message", text)
    page.press("#message", "Enter")


def last_reply(page: Any) -> Any:
    return page.locator(".message.assistant").last


def test_reply_streams_in_with_auth(page: Any, servers: dict[str, Server]) -> None:
    open_demo(page, servers["secured"], KEY)
    assert page.is_hidden("#key-panel")
    send(page, f"[[slow:0.05]][[reply:{REPLY}]]")
    reply = last_reply(page)
    # The text grows while the stream is open: the stop button is live mid-reply.
    page.wait_for_function(
        "() => { const r = [...document.querySelectorAll('.message.assistant .text')].pop();"
        " return r && r.textContent.length > 0 && !document.getElementById('stop').disabled; }")
    reply.locator(".meta").wait_for()
    assert reply.locator(".text").inner_text() == REPLY
    meta = reply.locator(".meta").inner_text()
    assert re.search(r"TTFT \d+ ms", meta), meta
    assert re.search(r"\d+ tokens · [\d.]+ tokens/s", meta), meta
    assert page.is_disabled("#stop") and page.is_enabled("#send")
    # The conversation goes on: the second request carries the first exchange.
    send(page, "[[reply:Second answer.]]")
    page.wait_for_function(
        "() => document.querySelectorAll('.message.assistant .meta').length === 2")
    assert last_reply(page).locator(".text").inner_text() == "Second answer."
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
    # The key went in headers only: no URL the page asked for holds it.
    assert page.requested_urls and not [u for u in page.requested_urls if KEY in u]


def test_stop_button_cancels_generation(page: Any, servers: dict[str, Server]) -> None:
    worker = servers["worker"]
    requests.post(worker.url + "/fake/reset", timeout=5)
    open_demo(page, servers["open"], None)
    words = " ".join(f"w{i}" for i in range(40))
    send(page, f"[[slow:0.2]][[reply:{words}]]")
    reply = last_reply(page)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.message.assistant .text')].pop()"
        ".textContent.includes('w1')")
    page.click("#stop")
    meta = reply.locator(".meta").inner_text()
    assert "stopped" in meta
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    shown = reply.locator(".text").inner_text()
    assert shown.startswith("w0 w1") and "w39" not in shown
    # Closing the EventSource reaches the worker: its generation is cancelled.
    deadline = time.monotonic() + 10
    while requests.get(worker.url + "/fake/stats", timeout=5).json()["cancelled"] < 1:
        assert time.monotonic() < deadline, "the worker kept generating"
        time.sleep(0.1)
    time.sleep(1)  # nothing more arrives after stop
    assert reply.locator(".text").inner_text() == shown


def test_works_with_auth_off(page: Any, servers: dict[str, Server]) -> None:
    open_demo(page, servers["open"], None)
    assert page.is_hidden("#key-panel")
    send(page, "[[reply:No key needed.]]")
    last_reply(page).locator(".meta").wait_for()
    assert last_reply(page).locator(".text").inner_text() == "No key needed."


def test_readable_errors(page: Any, servers: dict[str, Server]) -> None:
    page.goto(servers["secured"].url + "/demo")
    page.wait_for_selector("#key-panel:not([hidden])")
    page.fill("#key", "wrong-key")
    page.click("#save-key")
    page.wait_for_function(
        "() => document.getElementById('status').textContent.includes('refused')")
    assert page.is_visible("#key-panel")
    page.fill("#key", KEY)
    page.click("#save-key")
    page.wait_for_selector("#model option[value='demo-model']", state="attached")
    # A worker that fails mid-reply: the message says so, the page stays usable.
    send(page, "[[error:50001]]")
    error = page.locator(".message.error").last
    error.wait_for()
    assert "model worker" in error.inner_text()
    assert page.is_enabled("#send")
    # The key is checked when the reply is asked for, too.
    page.evaluate("sessionStorage.setItem('flaskchat.apiKey', 'revoked')")
    send(page, "hello")
    page.locator(".message.error").nth(1).wait_for()
    assert "API key was refused" in page.locator(".message.error").nth(1).inner_text()


def test_ticket_is_single_use_and_needs_the_key(servers: dict[str, Server]) -> None:
    url = servers["secured"].url
    body: dict[str, Any] = {"model": "demo-model", "messages": [{"role": "user", "content": "hi"}]}
    assert requests.post(url + "/demo/streams", json=body, timeout=10).status_code == 401
    missing = requests.post(url + "/demo/streams", json={**body, "model": "nope"},
                            headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    bad = requests.post(url + "/demo/streams", json={**body, "temperature": 9},
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
    made = requests.post(url + "/demo/streams", json=body,
                         headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert made.status_code == 201
    ticket = made.json()
    assert KEY not in ticket["url"]
    first = requests.get(f"{url}/{ticket['url']}", timeout=10)
    assert first.status_code == 200
    assert first.headers["Content-Type"].startswith("text/event-stream")
    assert first.text.rstrip().endswith("data: [DONE]")
    again = requests.get(f"{url}/{ticket['url']}", timeout=10)
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "stream_not_found"
    for forged in ("../../etc/passwd", "x" * 32, ticket["id"] + ".claimed"):
        assert requests.get(f"{url}/demo/stream/{forged}", timeout=10).status_code == 404


def test_page_is_locked_down(servers: dict[str, Server]) -> None:
    response = requests.get(servers["secured"].url + "/demo", timeout=10)
    assert response.status_code == 200
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    script = requests.get(servers["secured"].url + "/demo/static/demo.js", timeout=10)
    assert script.status_code == 200 and "EventSource" in script.text
    assert requests.get(servers["secured"].url + "/demo/static/..%2fapp.py",
                        timeout=10).status_code == 404

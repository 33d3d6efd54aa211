"""/metrics under several gunicorn workers, the request id, and the access log (JSON),
against the gateway (2 gevent workers), our controller and a fake worker."""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import orjson
import pytest
import requests

from tests.conftest import Server, start_controller, start_fake_worker, start_on_socket

KEY = "obs-key-5bd0e9a7"
SECRET = "SECRET-CONTENT-41f7"
ROUTE = "/v1/chat/completions"


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server, Path]]:
    started: list[Server] = []
    log_path = tmp_path_factory.mktemp("observability") / "gateway.log"
    with open(log_path, "wb") as log:
        try:
            controller = start_controller()
            started.append(controller)
            worker = start_fake_worker(controller.url, "--models", "obs-model")
            started.append(worker)
            gateway = start_on_socket(
                [sys.executable, "-m", "app.cli", "serve", "--fd", "{fd}", "--workers", "2",
                 "--controller-address", controller.url, "--log-level", "info",
                 "--log-format", "json", "--api-keys", KEY], "/health", stderr=log)
            started.append(gateway)
            yield gateway, worker, log_path
        finally:
            for server in reversed(started):
                server.stop()


def chat(gateway: Server, content: str, request_id: str | None = None,
         stream: bool = False, model: str = "obs-model") -> requests.Response:
    headers = {"Authorization": f"Bearer {KEY}"}
    if request_id:
        headers["X-Request-ID"] = request_id
    return requests.post(gateway.url + ROUTE, headers=headers, timeout=30, json={
        "model": model, "stream": stream,
        "messages": [{"role": "user", "content": content}]})


def samples(gateway: Server) -> dict[str, float]:
    text = requests.get(gateway.url + "/metrics", timeout=10).text
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def sample(found: dict[str, float], name: str, **labels: str) -> float:
    """The value of the series ``name`` whose labels include ``labels`` (0 if none)."""
    total = 0.0
    for series, value in found.items():
        series_name, _, rest = series.partition("{")
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if series_name == name and all(pairs.get(k) == v for k, v in labels.items()):
            total += value
    return total


def test_metrics_add_up_over_worker_processes(logged: tuple[Server, Server, Path]) -> None:
    gateway, worker, _ = logged
    for index in range(6):
        assert chat(gateway, f"hello {index}").status_code == 200
    for index in range(4):
        response = chat(gateway, f"stream {index}", stream=True)
        assert response.status_code == 200 and "[DONE]" in response.text
    assert chat(gateway, "hi", model="made-up-model").status_code == 404
    # Every scrape, whichever process answers it, sees all ten.
    for _ in range(6):
        found = samples(gateway)
        assert sample(found, "flaskchat_requests_total", route=ROUTE, model="obs-model",
                      status="200") == 10
        assert sample(found, "flaskchat_requests_total", route=ROUTE, model="-",
                      status="404") == 1
        assert sample(found, "flaskchat_time_to_first_token_seconds_count", route=ROUTE) == 4
        assert sample(found, "flaskchat_request_duration_seconds_count", route=ROUTE) == 11
        assert sample(found, "flaskchat_generated_tokens_total", model="obs-model") >= 10
        assert sample(found, "flaskchat_streams_in_flight") == 0
    assert "made-up-model" not in requests.get(gateway.url + "/metrics", timeout=10).text


def test_open_streams_and_upstream_errors_are_counted(
        logged: tuple[Server, Server, Path]) -> None:
    gateway, _, _ = logged
    response = requests.post(
        gateway.url + ROUTE, stream=True, timeout=30,
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "obs-model", "stream": True, "messages": [
            {"role": "user", "content": "[[slow:0.3]][[reply:a b c d e f]]"}]})
    chunks = response.iter_content(chunk_size=None)
    next(chunks)
    assert sample(samples(gateway), "flaskchat_streams_in_flight") == 1
    response.close()
    deadline = time.monotonic() + 10
    while sample(samples(gateway), "flaskchat_streams_in_flight") != 0:
        assert time.monotonic() < deadline, "a closed stream still counts as open"
        time.sleep(0.1)
    before = sample(samples(gateway), "flaskchat_upstream_errors_total")
    errored = chat(gateway, "[[error:50001]]", stream=True)
    assert '"error"' in errored.text
    assert sample(samples(gateway), "flaskchat_upstream_errors_total") == before + 1


def test_request_id_and_access_log(logged: tuple[Server, Server, Path]) -> None:
    gateway, worker, log_path = logged
    sent = chat(gateway, f"{SECRET} non-stream", request_id="obs-given-id-1")
    assert sent.headers["X-Request-ID"] == "obs-given-id-1"
    streamed = chat(gateway, f"{SECRET} stream", request_id="obs-given-id-2", stream=True)
    assert streamed.headers["X-Request-ID"] == "obs-given-id-2"
    made = chat(gateway, "no id")
    assert re.fullmatch(r"req-\w{22}", made.headers["X-Request-ID"])
    # A header that could forge log lines is replaced, not echoed.
    forged = chat(gateway, "hi", request_id="x\tinjected")
    assert forged.headers["X-Request-ID"] != "x\tinjected"
    assert requests.post(gateway.url + ROUTE, timeout=10, json={},
                         headers={"Authorization": "Bearer wrong-" + KEY}).status_code == 401
    # The worker got the same id.
    seen = {entry["request_id"] for entry in
            requests.get(worker.url + "/fake/log", timeout=5).json()}
    assert {"obs-given-id-1", "obs-given-id-2"} <= seen

    def access_lines() -> dict[str, dict[str, Any]]:
        lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines()
                 if line.startswith(b"{")]
        return {line["request_id"]: line for line in lines
                if line["logger"] == "flaskchat.access"}

    deadline = time.monotonic() + 10
    while not {"obs-given-id-1", "obs-given-id-2"} <= set(access_lines()):
        assert time.monotonic() < deadline, log_path.read_text()[-2000:]
        time.sleep(0.1)
    lines = access_lines()
    plain, stream = lines["obs-given-id-1"], lines["obs-given-id-2"]
    assert plain["status"] == 200 and plain["model"] == "obs-model"
    assert plain["route"] == ROUTE and plain["method"] == "POST"
    assert plain["latency_ms"] > 0 and plain["completion_tokens"] > 0
    assert plain["ttft_ms"] is None and plain["stream"] is False
    assert stream["stream"] is True and 0 < stream["ttft_ms"] <= stream["latency_ms"]
    assert stream["completion_tokens"] > 0
    # Never a key, never what was said.
    text = log_path.read_text()
    assert KEY not in text and SECRET not in text
    assert "injected" not in text

"""Chaos with real processes: killed workers, a stopped controller, hanging and garbage
workers, overload, clients that leave. Each test checks what the client saw, how long it
took, and that the next request is served. The times are printed (run with -s) and
checked against bounds generous enough for a slow shared machine."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

import orjson
import pytest
import requests

from tests.conftest import (ROOT, MakeClient, Server, start_controller, start_fake_worker,
                            start_gateway, start_on_socket, wait_for)
from tests.fake_data import DEFAULT_REPLY

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def controller() -> Iterator[Server]:
    server = start_controller()
    yield server
    server.stop()


GATEWAY_WORKERS: list[str] = []


@pytest.fixture(scope="module")
def gateway(controller: Server) -> Iterator[Server]:
    server = start_gateway(controller.url, "--read-timeout", "2", "--first-token-timeout", "3",
                           "--generation-timeout", "3", "--models-ttl", "1")
    GATEWAY_WORKERS[:] = gunicorn_workers(server)
    yield server
    server.stop()


def gunicorn_workers(server: Server) -> list[str]:
    return subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True,
                          text=True, cwd=ROOT).stdout.split()


def wait_for_model(gateway: Server, model: str) -> None:
    deadline = time.monotonic() + 15
    while model not in requests.get(gateway.url + "/ready").text:
        assert time.monotonic() < deadline, f"{model} never became ready"
        time.sleep(0.2)


@contextmanager
def serving(controller: Server, gateway: Server, model: str, *flags: str) -> Iterator[Server]:
    """A fake worker for ``model``, registered and seen by ``gateway``; stopped after."""
    worker = start_fake_worker(controller.url, "--models", model, *flags)
    try:
        wait_for_model(gateway, model)
        yield worker
    finally:
        worker.stop()


def chat(gateway: Server, model: str, content: str = "Hi", stream: bool = False,
         timeout: float = 30) -> requests.Response:
    return requests.post(gateway.url + "/v1/chat/completions", timeout=timeout, json={
        "model": model, "stream": stream, "messages": [{"role": "user", "content": content}]})


def events(response: requests.Response) -> list[bytes]:
    return [e for e in response.content.split(b"\n\n") if e.startswith(b"data:")]


def test_two_workers_one_killed_every_request_still_served(
        controller: Server, gateway: Server) -> None:
    workers = [start_fake_worker(controller.url, "--models", "pair") for _ in range(2)]
    try:
        wait_for(lambda: requests.get(gateway.url + "/ready").json()["workers"].get("pair")
                 == 2, what="both workers in the gateway's list")
        workers[0].process.kill()
        started = time.monotonic()
        for i in range(12):
            response = chat(gateway, "pair", stream=i % 2 == 1)
            assert response.status_code == 200
            if i % 2:
                assert events(response)[-1] == b"data: [DONE]"
                assert b'"error"' not in response.content
            else:
                assert response.json()["choices"][0]["message"]["content"] == DEFAULT_REPLY
        elapsed = time.monotonic() - started
        print(f"\n12 requests with one of two workers killed: 0 lost, {elapsed:.2f} s")
        assert elapsed < 10
    finally:
        for worker in workers:
            worker.stop()


def test_worker_killed_mid_stream(controller: Server, gateway: Server) -> None:
    with serving(controller, gateway, "victim") as worker:
        response = requests.post(gateway.url + "/v1/chat/completions", stream=True, json={
            "model": "victim", "stream": True, "messages": [
                {"role": "user", "content": "[[slow:0.3]][[reply:a b c d e f g h i j]]"}]})
        chunks = response.iter_content(chunk_size=None)
        received = b""
        while b'"content":"a ' not in received:
            received += next(chunks)
        worker.process.kill()
        killed = time.monotonic()
        for chunk in chunks:
            received += chunk
        delay = time.monotonic() - killed
        tail = [e for e in received.split(b"\n\n") if e]
        assert tail[-1] == b"data: [DONE]"
        error = orjson.loads(tail[-2][6:])["error"]
        assert error["type"] == "server_error"
        print(f"\nworker killed mid-stream: error event and [DONE] after {delay:.2f} s")
        assert delay < 3
        replacement = start_fake_worker(controller.url, "--models", "victim")
        try:
            deadline = time.monotonic() + 15
            while chat(gateway, "victim").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.3)
            print(f"next request served {time.monotonic() - killed:.2f} s after the kill")
        finally:
            replacement.stop()


def test_hanging_worker_times_out(controller: Server, gateway: Server) -> None:
    with serving(controller, gateway, "sleepy"):
        started = time.monotonic()
        response = chat(gateway, "sleepy", "[[hang]]")
        took = time.monotonic() - started
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
        started = time.monotonic()
        stalled = chat(gateway, "sleepy", "[[stall]]", stream=True)
        stall_took = time.monotonic() - started
        last = orjson.loads(events(stalled)[-2][6:])
        assert "did not answer in time" in last["error"]["message"]
        print(f"\nhung worker: 504 after {took:.2f} s; stalled stream: error event after "
              f"{stall_took:.2f} s")
        assert took < 10 and stall_took < 10
        assert chat(gateway, "sleepy").status_code == 200


def test_garbage_frames_become_an_error_event(controller: Server, gateway: Server) -> None:
    with serving(controller, gateway, "noisy"):
        response = chat(gateway, "noisy", "[[garbage]]", stream=True)
        assert b"malformed stream" in events(response)[-2]
        non_stream = chat(gateway, "noisy", "[[garbage]]")
        assert non_stream.status_code == 502
        assert chat(gateway, "noisy").status_code == 200


def test_client_leaving_a_non_stream_request_cancels_the_generation(
        controller: Server, gateway: Server) -> None:
    # --capabilities ...,generate_progress: it answers /worker_generate like ours (and so
    # stops when its request is closed)
    with serving(controller, gateway, "abandoned", "--capabilities",
                 "length_check,generate_progress") as worker:
        body = orjson.dumps({"model": "abandoned", "messages": [
            {"role": "user", "content": "[[slow:0.3]][[reply:a b c d e f g h i j k l]]"}]})
        host, port = gateway.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\n\r\n" + body)
            wait_for(lambda: requests.get(worker.url + "/fake/stats").json()["active"] == 1,
                     what="the generation to start")
        left = time.monotonic()
        while time.monotonic() - left < 5:
            stats = requests.get(worker.url + "/fake/stats").json()
            if stats["cancelled"] == 1:
                break
            time.sleep(0.05)
        print(f"\nclient left a non-stream request: generation cancelled after "
              f"{time.monotonic() - left:.2f} s")
        assert stats["cancelled"] == 1 and stats["active"] == 0


def test_controller_down_the_gateway_serves_from_its_cache(gateway: Server,
                                                           clients: MakeClient) -> None:
    own_controller = start_controller()
    worker = start_fake_worker(own_controller.url, "--models", "cached")
    own_gateway = start_gateway(own_controller.url, "--models-ttl", "1")
    try:
        wait_for_model(own_gateway, "cached")
        own_controller.stop()
        ready = wait_for(lambda: (answer := requests.get(own_gateway.url + "/ready").json())
                         ["status"] == "degraded" and answer, what="a failed refresh")
        assert ready["models"] == ["cached"]
        assert chat(own_gateway, "cached").status_code == 200
        assert chat(own_gateway, "cached", stream=True).status_code == 200
        unknown = chat(own_gateway, "never-heard-of-it")
        assert unknown.status_code == 404
    finally:
        own_gateway.stop()
        worker.stop()
        own_controller.stop()


def test_admission_control_answers_429_and_frees_every_place(controller: Server) -> None:
    worker = start_fake_worker(controller.url, "--models", "crowded")
    small = start_gateway(controller.url, "--max-in-flight", "2", "--max-queued", "1",
                          "--queue-timeout", "0.5")
    try:
        wait_for_model(small, "crowded")
        slow: Any = {"model": "crowded", "stream": True, "messages": [
            {"role": "user", "content": "[[slow:0.2]][[reply:a b c d e f g h]]"}]}
        holders = [requests.post(small.url + "/v1/chat/completions", json=slow, stream=True)
                   for _ in range(2)]
        started = time.monotonic()
        queued = chat(small, "crowded")  # waits 0.5 s for a place, then 429
        assert queued.status_code == 429 and time.monotonic() - started >= 0.4
        assert queued.headers["Retry-After"] == "1"
        assert queued.json()["error"]["type"] == "rate_limit_error"
        for holder in holders:
            assert holder.content.endswith(b"data: [DONE]\n\n")
        assert chat(small, "crowded").status_code == 200
        assert requests.get(small.url + "/health").json()["in_flight"] == 0
    finally:
        small.stop()
        worker.stop()


def test_busy_worker_is_skipped_then_429(controller: Server) -> None:
    worker = start_fake_worker(controller.url, "--models", "single-file")
    capped = start_gateway(controller.url, "--max-worker-in-flight", "1")
    try:
        wait_for_model(capped, "single-file")
        holder = requests.post(capped.url + "/v1/chat/completions", stream=True, json={
            "model": "single-file", "stream": True,
            "messages": [{"role": "user", "content": "[[slow:0.2]][[reply:a b c d e]]"}]})
        busy = chat(capped, "single-file")
        assert busy.status_code == 429 and "busy" in busy.json()["error"]["message"]
        holder.close()  # its place with the worker is given back
        wait_for(lambda: chat(capped, "single-file").status_code == 200)
    finally:
        capped.stop()
        worker.stop()


def test_controller_secret_guards_registration() -> None:
    guarded = start_on_socket(
        [sys.executable, "-m", "app.cli", "controller", "--fd", "{fd}",
         "--log-level", "warning"], "/test_connection",
        env={"FLASKCHAT_CONTROLLER_WORKER_SECRET": "s3cret"})
    try:
        entry: dict[str, Any] = {"worker_name": "http://10.9.9.9:1", "check_heart_beat": False,
                                 "worker_status": {"model_names": ["m"]}}
        refused = requests.post(guarded.url + "/register_worker", json=entry)
        assert refused.status_code == 401 and "s3cret" not in refused.text
        wrong = requests.post(guarded.url + "/register_worker", json=entry,
                              headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert requests.post(guarded.url + "/list_models", json={}).json()["models"] == []
        ok = requests.post(guarded.url + "/register_worker", json=entry,
                           headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert requests.post(guarded.url + "/list_models", json={}).json()["models"] == ["m"]
    finally:
        guarded.stop()


def test_keys_never_reach_the_logs(controller: Server, tmp_path: Any) -> None:
    log = tmp_path / "gateway.log"
    with open(log, "wb") as sink:
        sock_server = start_on_socket(
            [sys.executable, "-m", "app.cli", "serve", "--fd", "{fd}", "--controller-address",
             controller.url, "--log-level", "debug"], "/health",
            env={"FLASKCHAT_API_KEYS": "key-alpha-123"}, stderr=sink)
        try:
            for key in ("key-alpha-123", "wrong-key-456"):
                requests.get(sock_server.url + "/v1/models",
                             headers={"Authorization": f"Bearer {key}"})
                chat_body: Any = {"model": "absent", "messages": HI}
                requests.post(sock_server.url + "/v1/chat/completions", json=chat_body,
                              headers={"Authorization": f"Bearer {key}"})
        finally:
            sock_server.stop()
    text = log.read_text()
    assert "key-alpha-123" not in text and "wrong-key-456" not in text


def test_gunicorn_worker_survives_everything_above(gateway: Server) -> None:
    """No request above took the gateway's worker process down, or leaked a place."""
    assert gunicorn_workers(gateway) == GATEWAY_WORKERS
    assert requests.get(gateway.url + "/health").json()["in_flight"] == 0

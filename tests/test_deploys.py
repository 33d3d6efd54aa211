"""Deploys drop no request: SIGHUP reloads and SIGTERM stops under load, with real gunicorn
processes and sockets, plain requests sessions (no retries) and the official client
(max_retries=0); a rolling restart of two gateways behind the tested nginx site file."""
from __future__ import annotations

import collections
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
import requests
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import (MakeClient, Server, start_controller, start_fake_worker,
                            start_gateway, wait_for)
from tests.nginx import running_nginx

WORDS = " ".join(f"w{i}" for i in range(16))  # a reply of 16 tokens
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": f"[[reply:{WORDS}]]"}]


class Load:
    """Clients sending requests back to back on their keep-alive connections, half of them
    streams: plain requests sessions and official clients. Counts answers and failures."""

    def __init__(self, base_url: str, clients: MakeClient, per_kind: int = 2) -> None:
        self.base_url = base_url
        self.clients = clients
        self.per_kind = per_kind
        self.ok = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.longest = 0.0  # the longest a request took: what a reload made a client wait
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "Load":
        for run in (self._plain, self._sdk):
            for stream in (False, True):
                for _ in range(self.per_kind):
                    self._threads.append(threading.Thread(target=run, args=(stream,)))
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _record(self, started: float, failure: str | None) -> None:
        self.longest = max(self.longest, time.monotonic() - started)
        if failure is None:
            self.ok += 1
        else:
            self.failures[failure[:160]] += 1

    def _plain(self, stream: bool) -> None:
        session = requests.Session()
        body: dict[str, Any] = {"model": "deployed", "messages": MESSAGES, "stream": stream}
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                answer = session.post(self.base_url + "/chat/completions", json=body,
                                      timeout=60)
                text = answer.text
                complete = text.rstrip().endswith("data: [DONE]") and "w15" in text \
                    if stream else answer.json()["choices"][0]["message"]["content"] == WORDS
                failure = None if answer.status_code == 200 and complete else \
                    f"plain: HTTP {answer.status_code} {text[:80]!r}"
            except Exception as exc:  # every kind of failure is counted, none is expected
                failure = f"plain: {type(exc).__name__}: {exc}"
            self._record(started, failure)
        session.close()

    def _sdk(self, stream: bool) -> None:
        client = self.clients(self.base_url)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                if stream:
                    chunks = client.chat.completions.create(model="deployed", stream=True,
                                                            messages=MESSAGES)
                    text = "".join(c.choices[0].delta.content or "" for c in chunks
                                   if c.choices)
                else:
                    text = client.chat.completions.create(
                        model="deployed", messages=MESSAGES).choices[0].message.content or ""
                failure = None if text == WORDS else f"sdk: incomplete {text[:80]!r}"
            except openai.APIError as exc:
                failure = f"sdk: {type(exc).__name__}: {exc}"
            self._record(started, failure)


def worker_pids(gateway: Server) -> set[str]:
    """The arbiter's worker processes."""
    found = subprocess.run(["pgrep", "-P", str(gateway.process.pid)], capture_output=True,
                           text=True).stdout.split()
    return set(found)


@pytest.fixture(scope="module")
def backend() -> Iterator[Server]:
    controller = start_controller()
    worker = start_fake_worker(controller.url, "--models", "deployed")
    try:
        yield controller
    finally:
        worker.stop()
        controller.stop()


def chat_requests_served(gateway: Server) -> float:
    """Chat requests this gateway has answered, by its own /metrics."""
    metrics = requests.get(gateway.url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("flaskchat_requests_total{")
               and 'route="/v1/chat/completions"' in line)


def log_problems(path: Path) -> list[str]:
    return [line for line in path.read_text(errors="replace").splitlines()
            if "Traceback" in line or "[ERROR]" in line or " ERROR " in line]


def test_three_reloads_under_load_drop_no_request(backend: Server, clients: MakeClient,
                                                  tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    with log.open("wb") as stderr:
        gateway = start_gateway(backend.url, "--log-level", "info", "--drain-seconds", "2",
                                stderr=stderr)
    try:
        wait_for(lambda: "deployed" in requests.get(gateway.url + "/ready").text)
        with Load(gateway.url + "/v1", clients) as load:
            wait_for(lambda: load.ok >= 50)
            for _ in range(3):
                old = worker_pids(gateway)
                counted = load.ok
                gateway.process.send_signal(signal.SIGHUP)
                # The reload is over when the old worker has exited and traffic flows on.
                wait_for(lambda: not old & worker_pids(gateway) and load.ok >= counted + 100,
                         30, "a reload under load")
            wait_for(lambda: load.ok >= 1000, 120, "1,000 requests")
        print(f"\n3 reloads under load: {load.ok} requests answered, "
              f"{sum(load.failures.values())} failed; the longest took {load.longest:.2f} s")
        assert dict(load.failures) == {}
        assert load.ok >= 1000
        assert log_problems(log) == []
    finally:
        gateway.stop()


def test_a_request_arriving_as_the_stop_begins_is_answered(backend: Server) -> None:
    """The stray-timeout race: the old worker class killed idle connections' greenlets with
    their keep-alive timeout, delivered later, into a request that had arrived meanwhile.
    Here a request follows a stop signal on a kept-alive connection at once, many times."""
    gateway = start_gateway(backend.url)
    body = (b'{"model": "deployed", "messages": [{"role": "user", "content": "hi"}]}')
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Type: "
               b"application/json\r\nContent-Length: " + str(len(body)).encode()
               + b"\r\n\r\n" + body)
    host, port = gateway.url.removeprefix("http://").split(":")
    try:
        for attempt in range(6):
            pid = wait_for(lambda: worker_pids(gateway), 30, "a worker")
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                sock.sendall(request)
                assert read_answer(sock).startswith(b"HTTP/1.1 200")
                subprocess.run(["kill", "-TERM", *pid], check=True)  # the worker stops now
                sock.sendall(request)  # the next request, on the same connection, at once
                answer = read_answer(sock)
            assert answer.startswith(b"HTTP/1.1 200"), (attempt, answer[:200])
            wait_for(lambda: worker_pids(gateway) and not pid & worker_pids(gateway), 30)
    finally:
        gateway.stop()


def read_answer(sock: socket.socket) -> bytes:
    """One HTTP answer with a Content-Length body, whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        if not got:
            return data
        data += got
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        got = sock.recv(65536)
        if not got:
            break
        body += got
    return head + b"\r\n\r\n" + body


def test_sigterm_lets_open_streams_finish_and_ready_says_draining(backend: Server) -> None:
    gateway = start_gateway(backend.url, "--graceful-timeout", "30", "--drain-seconds", "2")
    slow = [{"role": "user", "content": "[[slow:0.25]][[reply:a b c d e f g h i j k l]]"}]
    bodies: list[bytes] = []
    try:
        streams = [requests.post(gateway.url + "/v1/chat/completions", stream=True,
                                 timeout=30, json={"model": "deployed", "messages": slow,
                                                   "stream": True}) for _ in range(4)]
        chunks = [r.iter_content(chunk_size=None) for r in streams]
        firsts = [next(c) for c in chunks]  # every stream is under way
        gateway.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # The arbiter passes the signal on to its worker: /ready turns within the second.
        answers: list[requests.Response] = []

        def draining() -> bool:
            answers.append(requests.get(gateway.url + "/ready", timeout=5))
            return answers[-1].status_code == 503
        wait_for(draining, 1.0, "/ready to say draining")
        ready = answers[-1]
        assert time.monotonic() - signalled < 1.5
        assert ready.json()["error"]["code"] == "draining"
        late = requests.post(gateway.url + "/v1/chat/completions", timeout=10,
                             json={"model": "deployed", "messages": [{"role": "user",
                                                                      "content": "hi"}]})
        # a new connection, still accepted while the old process drains
        assert late.status_code == 200 and late.headers["Connection"] == "close"

        def finish(index: int) -> None:
            bodies.append(firsts[index] + b"".join(chunks[index]))
        readers = [threading.Thread(target=finish, args=(i,)) for i in range(4)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(30)
        ended = time.monotonic()
        assert len(bodies) == 4
        for body in bodies:
            assert body.rstrip().endswith(b"data: [DONE]") and b'"content":"l"' in body
        assert gateway.process.wait(30) == 0
        exited = time.monotonic()
        print(f"\nSIGTERM with 4 open streams: they ended {ended - signalled:.2f} s after "
              f"it, the process {exited - ended:.2f} s after them")
        assert exited - ended < 5  # the drain window, not the graceful timeout
    finally:
        gateway.stop()


def test_graceful_timeout_ends_a_stream_with_an_error_event(backend: Server,
                                                            clients: MakeClient) -> None:
    gateway = start_gateway(backend.url, "--graceful-timeout", "5")
    try:
        client = clients(gateway.url + "/v1")
        stream = client.chat.completions.create(model="deployed", stream=True, messages=[
            {"role": "user", "content": "[[slow:0.5]][[reply:" + " ".join(["x"] * 40) + "]]"}])
        next(iter(stream))
        gateway.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        with pytest.raises(openai.APIError, match="stopping"):
            for _ in stream:
                pass
        assert time.monotonic() - signalled < 5
        assert gateway.process.wait(10) == 0
    finally:
        gateway.stop()


def test_rolling_restart_behind_nginx_drops_no_request(
        backend: Server, clients: MakeClient) -> None:
    gateways = [start_gateway(backend.url, "--drain-seconds", "2") for _ in range(2)]
    ports = [int(g.url.rsplit(":", 1)[1]) for g in gateways]
    try:
        for gateway in gateways:
            wait_for(lambda: "deployed" in requests.get(gateway.url + "/ready").text)
        with running_nginx(ports) as url, Load(url + "/v1", clients) as load:
            wait_for(lambda: load.ok >= 50)
            for index, port in enumerate(ports):  # one after the other, as a deploy would
                gateways[index].process.send_signal(signal.SIGTERM)
                assert gateways[index].process.wait(30) == 0
                gateways[index] = start_gateway(backend.url, "--drain-seconds", "2",
                                                port=port)
                # The next one may stop once nginx sends this one traffic again.
                wait_for(lambda: chat_requests_served(gateways[index]) >= 20, 60,
                         "nginx to send the restarted gateway traffic")
            wait_for(lambda: load.ok >= 500, 120)
        print(f"\nrolling restart of two gateways behind nginx: {load.ok} requests, "
              f"{sum(load.failures.values())} failed, the longest {load.longest:.2f} s")
        assert dict(load.failures) == {}
    finally:
        for gateway in gateways:
            gateway.stop()


def test_a_reload_rereads_keys_upstreams_and_the_env_file(backend: Server,
                                                          tmp_path: Path) -> None:
    """What a reload is for: new API keys, a new upstreams file, a new log level, without a
    restart; and settings that do not load leave the old ones serving."""
    keys, env, upstreams = tmp_path / "keys", tmp_path / "env", tmp_path / "upstreams.toml"
    keys.write_text("old-key\n")
    env.write_text("FLASKCHAT_LOG_LEVEL=warning\n")
    upstreams.write_text('[[upstream]]\nbase_url = "http://127.0.0.1:9/v1"\n'
                         'models = ["first-upstream"]\n')
    log = tmp_path / "gateway.log"
    with log.open("wb") as stderr:
        gateway = start_gateway(backend.url, "--api-keys-file", str(keys), "--env-file",
                                str(env), "--upstreams", str(upstreams), stderr=stderr)

    def models(key: str) -> requests.Response:
        return requests.get(gateway.url + "/v1/models", timeout=10,
                            headers={"Authorization": f"Bearer {key}"})

    def reload() -> None:
        old = worker_pids(gateway)
        gateway.process.send_signal(signal.SIGHUP)
        wait_for(lambda: worker_pids(gateway) and not old & worker_pids(gateway), 30)

    try:
        assert models("old-key").status_code == 200
        assert "flaskchat.access" not in log.read_text()  # INFO lines are off at warning
        keys.write_text("new-key\n")
        env.write_text("FLASKCHAT_LOG_LEVEL=info\n")
        upstreams.write_text(upstreams.read_text().replace("first-upstream", "next-upstream"))
        reload()
        assert models("old-key").status_code == 401
        listed = [card["id"] for card in models("new-key").json()["data"]]
        assert "next-upstream" in listed and "first-upstream" not in listed
        wait_for(lambda: "flaskchat.access" in log.read_text(), 10, "INFO access lines")
        upstreams.write_text("[[upstream]]\nbase_url = 'not a url'\nmodels = ['x']\n")
        reload()  # a broken file: the reload keeps the settings in use, and says so
        assert models("new-key").status_code == 200
        assert "next-upstream" in models("new-key").text
        assert "reload kept the settings in use" in log.read_text()
    finally:
        gateway.stop()

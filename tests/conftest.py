"""Real processes on 127.0.0.1: our controller, fake workers, and the gateway under gunicorn
with gevent workers. Each starts once per test session on a socket bound to port 0."""
from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import openai
import pytest
import requests
from hypothesis import HealthCheck, settings

# Slow, shared CI machines: no per-example deadline, no "input generation is slow" failure.
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key-123"
# Nothing a test runs may read or write the user's own key database (~/.local/share).
DATA_HOME = tempfile.mkdtemp(prefix="flaskchat-tests-")
os.environ["XDG_DATA_HOME"] = DATA_HOME
_databases = itertools.count()


def new_database_url() -> str:
    """A fresh SQLite file: each gateway gets its own keys and usage unless a test shares
    one on purpose."""
    return f"sqlite:///{DATA_HOME}/gateway-{next(_databases)}.db"


T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 15.0, what: str = "") -> T:
    """Polls ``condition`` until it returns something true, and returns that; fails after
    ``timeout`` seconds. Tests wait on conditions, never on a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:g} s waiting for "
                                 f"{what or getattr(condition, '__name__', 'a condition')}")
        time.sleep(0.05)


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def bound_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


def wait_until_up(url: str, process: subprocess.Popen[bytes], path: str,
                  timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}")
        try:
            if requests.get(url + path, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def start_on_socket(argv: list[str], path: str, env: dict[str, str] | None = None,
                    stderr: Any = None, port: int = 0) -> Server:
    """Starts ``argv`` (``{fd}`` and ``{port}`` replaced) on a socket bound here, so there
    is no race for a free port (``port``: that one, for a server restarted in place)."""
    sock = bound_socket(port)
    bound = str(sock.getsockname()[1])
    url = f"http://127.0.0.1:{bound}"
    args = [a.replace("{fd}", str(sock.fileno())).replace("{port}", bound) for a in argv]
    process = subprocess.Popen(args, cwd=ROOT, pass_fds=(sock.fileno(),),
                               env={**os.environ, **(env or {})}, stderr=stderr)
    sock.close()
    wait_until_up(url, process, path)
    return Server(url, process)


def start_controller(*extra: str) -> Server:
    return start_on_socket([sys.executable, "-m", "app.cli", "controller", "--fd", "{fd}",
                            "--log-level", "warning", *extra], "/test_connection")


def start_gateway(controller_url: str, *extra: str, env: dict[str, str] | None = None,
                  stderr: Any = None, port: int = 0) -> Server:
    # Through the environment, not flags (a flag would beat an env file a test gives): a
    # quiet log, and a short drain, since every stop (each test's teardown) waits it out;
    # the deploy tests ask for the real one.
    return start_on_socket([sys.executable, "-m", "app.cli", "serve", "--fd", "{fd}",
                            "--controller-address", controller_url, *extra], "/health",
                           {"FLASKCHAT_LOG_LEVEL": "warning", "FLASKCHAT_DRAIN_SECONDS": "0.2",
                            "FLASKCHAT_DATABASE_URL": new_database_url(), **(env or {})},
                           stderr, port)


def start_fake(script: str, *args: str) -> Server:
    """Starts tests/<script>, which prints ``PORT <n>`` once it listens on 127.0.0.1."""
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / script), *args],
                               cwd=ROOT, stdout=subprocess.PIPE)
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if not line.startswith("PORT "):
        process.kill()
        raise RuntimeError(f"{script} did not start: {line!r}")
    return Server(f"http://127.0.0.1:{int(line.split()[1])}", process)


def start_fake_worker(controller_url: str, *extra: str) -> Server:
    return start_fake("fake_worker.py", "--controller", controller_url, *extra)


# Workers registered with the session's controller: model name -> fake_worker.py flags.
WORKERS: dict[str, list[str]] = {
    "fake-model": ["--capabilities", "length_check,messages", "--embedding-dim", "384"],
    "vicuna-stock": ["--conv-template", "vicuna_v1.1", "--context-length", "64"],
    "llama2-stock": ["--conv-template", "llama-2"],
    "qwen-stock": ["--conv-template", "qwen-7b-chat"],
    "ignores-stop": ["--ignore-stop"],
    "vision-model": ["--multimodal", "--conv-template", "vicuna_v1.1"],
    "defaults-model": ["--capabilities", "length_check,messages,sampling_defaults"],
}


@dataclass
class Stack:
    controller: Server
    gateway: Server
    workers: dict[str, Server]

    @property
    def base_url(self) -> str:
        return self.gateway.url + "/v1"

    def worker(self, model: str) -> Server:
        return self.workers[model]

    def worker_log(self, model: str) -> list[dict[str, Any]]:
        log: list[dict[str, Any]] = requests.get(self.worker(model).url + "/fake/log",
                                                 timeout=5).json()
        return log

    def worker_stats(self, model: str) -> dict[str, Any]:
        stats: dict[str, Any] = requests.get(self.worker(model).url + "/fake/stats",
                                             timeout=5).json()
        return stats

    def reset_worker(self, model: str) -> None:
        requests.post(self.worker(model).url + "/fake/reset", timeout=5)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    servers: list[Server] = []
    try:
        controller = start_controller()
        servers.append(controller)
        workers = {}
        for model, flags in WORKERS.items():
            workers[model] = start_fake_worker(controller.url, "--models", model, *flags)
            servers.append(workers[model])
        gateway = start_gateway(
            controller.url, "--api-keys", f"{API_KEY},second-key", "--workers", "2",
            env={"FLASKCHAT_READ_TIMEOUT": "3", "FLASKCHAT_GENERATION_TIMEOUT": "4",
                 "FLASKCHAT_KEEPALIVE_INTERVAL": "0.5"})
        servers.append(gateway)
        yield Stack(controller, gateway, workers)
    finally:
        for server in reversed(servers):
            server.stop()


MakeClient = Callable[..., openai.OpenAI]


@pytest.fixture(scope="session")
def clients() -> Iterator[MakeClient]:
    """Makes official openai clients (no retries: one failing call stays one call) and
    closes them, and their pooled connections, at the end."""
    made: list[openai.OpenAI] = []

    def make(base_url: str, api_key: str = "none", **options: Any) -> openai.OpenAI:
        made.append(openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                                  **options))
        return made[-1]
    yield make
    for client in made:
        client.close()


@pytest.fixture()
def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}

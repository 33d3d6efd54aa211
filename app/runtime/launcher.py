"""`flaskchat up`: the controller, a chat worker, an embedding worker and the gateway as one
process tree, started in order, watched, and stopped together on Ctrl-C or SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

READY_TIMEOUT = 600.0  # the first start converts SmolLM2 from GGUF (~20 s on 2 cores)


@dataclass
class Plan:
    host: str
    port: int
    chat_model: str
    embedding_model: str
    api_keys: tuple[str, ...]
    workers: int
    concurrency: int
    controller_port: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]


class Stack:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.children: list[Child] = []
        self.stopping = False

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            self._start_all()
            url = f"http://{self.plan.host}:{self.plan.port}"
            models = self._wait_ready(url)
            _print_welcome(url, models, bool(self.plan.api_keys))
            return self._watch()
        except _Failed as exc:
            print(f"flaskchat up: {exc}", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt:
            return 0
        finally:
            self.stop()

    def _start_all(self) -> None:
        plan = self.plan
        controller_port = plan.controller_port or _free_port()
        controller = f"http://127.0.0.1:{controller_port}"
        self._spawn("controller", ["controller", "--host", "127.0.0.1",
                                   "--port", str(controller_port), "--log-level", "warning"])
        _wait_http(controller + "/test_connection", self, 60)
        for role, model in (("chat worker", plan.chat_model),
                            ("embedding worker", plan.embedding_model)):
            if model.lower() == "none":
                continue
            port = _free_port()
            # The embedded SmolLM2 runs in float16: 2.5x the tokens/s of float32 on the
            # 2-core EPYC this was measured on, with the same greedy answers.
            dtype = "float16" if model.lower() == "smollm2" else "auto"
            limit = ["--limit-worker-concurrency", str(plan.concurrency)] \
                if plan.concurrency > 0 else []  # else the engine's own default
            self._spawn(role, ["worker", "--host", "127.0.0.1", "--port", str(port),
                               "--controller-address", controller, "--model-path", model,
                               *limit, "--heart-beat-interval", "15", "--dtype", dtype])
        env = {"FLASKCHAT_API_KEYS": ",".join(plan.api_keys)} if plan.api_keys else {}
        self._spawn("gateway", ["serve", "--host", plan.host, "--port", str(plan.port),
                                "--controller-address", controller,
                                "--workers", str(plan.workers), "--log-level", "warning"], env)

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        print(f"flaskchat up: starting the {name}", file=sys.stderr, flush=True)
        process = subprocess.Popen([sys.executable, "-m", "app.cli", *args],
                                   env={**os.environ, **self.plan.extra_env, **(env or {})})
        self.children.append(Child(name, process))

    def _wait_ready(self, url: str) -> list[str]:
        wanted = sum(1 for m in (self.plan.chat_model, self.plan.embedding_model)
                     if m.lower() != "none")
        print("flaskchat up: loading the models (the first start converts SmolLM2 once)",
              file=sys.stderr, flush=True)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self._check_children()
            body = _get_json(url + "/ready")
            if body and len(body.get("models", [])) >= wanted:
                models: list[str] = body["models"]
                return models
            time.sleep(0.5)
        raise _Failed(f"the models were not ready after {READY_TIMEOUT:.0f} s")

    def _watch(self) -> int:
        while not self.stopping:
            self._check_children()
            time.sleep(0.5)
        return 0

    def _check_children(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None and not self.stopping:
                raise _Failed(f"the {child.name} exited with code {code}; stopping the rest")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            self.stopping = True
            raise KeyboardInterrupt

    def stop(self) -> None:
        self.stopping = True
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.terminate()
        for child in reversed(self.children):
            try:
                child.process.wait(30)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()


class _Failed(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _wait_http(url: str, stack: Stack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack._check_children()
        if _get_json(url) is not None:
            return
        time.sleep(0.2)
    raise _Failed(f"{url} did not answer within {timeout:.0f} s")


def _print_welcome(url: str, models: list[str], auth: bool) -> None:
    chat = next((m for m in models if "minilm" not in m.lower()), models[0])
    key = "YOUR_KEY" if auth else "none"
    header = f' -H "Authorization: Bearer {key}"' if auth else ""
    body = json.dumps({"model": chat, "messages": [
        {"role": "user", "content": "What is the capital of France?"}]})
    python = (f"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='{key}'); "
              f"print(c.chat.completions.create(model='{chat}', messages=[{{'role': 'user', "
              f"'content': 'Hi!'}}]).choices[0].message.content)")
    print(f"""
flaskchat is up: {url}/v1   (models: {', '.join(models)})

  curl {url}/v1/chat/completions -H "Content-Type: application/json"{header} \\
    -d '{body}'

  python -c "{python}"

  In a browser: {url}/demo      Metrics: {url}/metrics

Ctrl-C stops everything.
""", flush=True)

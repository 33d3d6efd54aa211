"""A deploy (SIGTERM to gunicorn's arbiter) lets running streams finish; new connections
are no longer accepted; the shared state directory is removed at the end."""
from __future__ import annotations

import os
import signal
import tempfile
import time
from typing import Any

import requests

from tests.conftest import start_controller, start_fake_worker, start_gateway


def test_sigterm_lets_a_running_stream_finish() -> None:
    controller = start_controller()
    worker = start_fake_worker(controller.url, "--models", "draining")
    before = _state_dirs()
    gateway = start_gateway(controller.url, "--workers", "2")
    made = _state_dirs() - before
    try:
        body: dict[str, Any] = {"model": "draining", "stream": True, "messages": [
            {"role": "user", "content": "[[slow:0.3]][[reply:a b c d e f g]]"}]}
        response = requests.post(gateway.url + "/v1/chat/completions", stream=True,
                                 timeout=30, json=body)
        chunks = response.iter_content(chunk_size=None)
        received = next(chunks)
        gateway.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for chunk in chunks:
            received += chunk
        assert received.rstrip().endswith(b"data: [DONE]")
        assert received.count(b'"content":"') >= 7  # role chunk + all seven words
        print(f"\nstream finished {time.monotonic() - signalled:.2f} s after SIGTERM")
        assert gateway.process.wait(20) == 0
        try:
            refused = requests.get(gateway.url + "/health", timeout=2).status_code != 200
        except requests.ConnectionError:
            refused = True
        assert refused
        assert len(made) == 1 and not made & _state_dirs()
    finally:
        gateway.stop()
        worker.stop()
        controller.stop()


def _state_dirs() -> set[str]:
    root = tempfile.gettempdir()
    return {name for name in os.listdir(root) if name.startswith("flaskchat-")
            and os.path.isdir(os.path.join(root, name, "metrics"))}

"""The gateway behind a real nginx (Debian's package), configured with the very site file
docs/deploy.md tells operators to use: streams arrive chunk by chunk, non-stream requests,
errors and request ids pass through.

Skipped with the reason when nginx is not installed, unless FLASKCHAT_REQUIRE_NGINX=1 (set
by .ci/run), which makes that a failure.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from tests.conftest import (ROOT, Server, MakeClient, start_controller, start_fake_worker,
                            start_gateway)

SITE = ROOT / "docs" / "nginx-flaskchat.conf"


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                      else None)
    if found is None:
        reason = "nginx is not installed (Debian: apt-get install nginx-light)"
        if os.environ.get("FLASKCHAT_REQUIRE_NGINX") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nginx_config(workdir: Path, gateway_port: int, port: int) -> str:
    site = SITE.read_text()
    assert "server 127.0.0.1:8000;" in site and "listen 80;" in site
    site = site.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{gateway_port};")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    temp = "\n".join(f"    {kind}_temp_path {workdir / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root root;" if os.geteuid() == 0 else ""
    return f"""{user}
worker_processes 1;
pid {workdir / 'nginx.pid'};
error_log {workdir / 'error.log'} warn;
events {{ worker_connections 256; }}
http {{
    access_log {workdir / 'access.log'};
{temp}
{site}
}}
"""


@pytest.fixture(scope="module")
def behind_nginx() -> Iterator[tuple[str, Server]]:
    binary = nginx_binary()
    started: list[Server] = []
    workdir = Path(tempfile.mkdtemp(prefix="flaskchat-nginx-"))
    nginx = None
    try:
        controller = start_controller()
        started.append(controller)
        started.append(start_fake_worker(controller.url, "--models", "proxied"))
        gateway = start_gateway(controller.url, "--workers", "2")
        started.append(gateway)
        port = free_port()
        (workdir / "nginx.conf").write_text(
            nginx_config(workdir, int(gateway.url.rsplit(":", 1)[1]), port))
        nginx = subprocess.Popen([binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf"),
                                  "-e", str(workdir / "error.log"), "-g", "daemon off;"])
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if nginx.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nginx did not start: "
                                   + (workdir / "error.log").read_text()[-2000:])
            time.sleep(0.1)
        yield url, gateway
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        for server in reversed(started):
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


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

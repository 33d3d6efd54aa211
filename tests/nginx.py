"""A real nginx (Debian's package) in front of gateways, configured with the very site file
docs/deploy.md tells operators to use (docs/nginx-flaskchat.conf).

Skips with the reason when nginx is not installed, unless FLASKCHAT_REQUIRE_NGINX=1 (set by
.ci/run), which makes that a failure.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import pytest
import requests

from tests.conftest import ROOT

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


def nginx_config(workdir: Path, gateway_ports: Sequence[int], port: int) -> str:
    """The site file with its one upstream server line made one per gateway."""
    site = SITE.read_text()
    line = "    server 127.0.0.1:8000 "
    assert site.count(line) == 1 and "listen 80;" in site
    start = site.index(line)
    end = site.index("\n", start) + 1
    template = site[start:end]
    site = site[:start] + "".join(template.replace(":8000", f":{p}") for p in gateway_ports) \
        + site[end:]
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


@contextmanager
def running_nginx(gateway_ports: Sequence[int]) -> Iterator[str]:
    """nginx in front of the gateways on ``gateway_ports``; yields its URL."""
    binary = nginx_binary()
    workdir = Path(tempfile.mkdtemp(prefix="flaskchat-nginx-"))
    port = free_port()
    (workdir / "nginx.conf").write_text(nginx_config(workdir, gateway_ports, port))
    nginx = subprocess.Popen([binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf"),
                              "-e", str(workdir / "error.log"), "-g", "daemon off;"])
    url = f"http://127.0.0.1:{port}"
    try:
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
        yield url
    finally:
        nginx.terminate()
        nginx.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)

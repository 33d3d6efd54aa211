"""A real PostgreSQL 15 and a real Redis (Debian's packages), each started by the tests on
an ephemeral port in a temp dir and stopped at the end. No fakes of either.

Skips with the reason when one is not installed, unless FLASKCHAT_REQUIRE_DATABASES=1 (set
by .ci/run), which makes that a failure. PostgreSQL refuses to run as root, so as root it
runs as the ``postgres`` user through ``runuser``.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.nginx import free_port


def _unavailable(reason: str) -> None:
    if os.environ.get("FLASKCHAT_REQUIRE_DATABASES") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def postgres_bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        _unavailable("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    return Path(found[-1]).parent


def as_database_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", "postgres", "--", *argv]


@dataclass
class Postgres:
    bin_dir: Path
    data_dir: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        log = open(self.data_dir.parent / "postgres.log", "ab")
        self.process = subprocess.Popen(
            as_database_user([str(self.bin_dir / "postgres"), "-D", str(self.data_dir),
                              "-p", str(self.port), "-h", "127.0.0.1", "-k",
                              str(self.data_dir.parent), "-c", "fsync=off",
                              "-c", "max_connections=200"]),
            stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 30
        while subprocess.run([str(self.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p",
                              str(self.port), "-q"]).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("postgres did not start: "
                                   + (self.data_dir.parent / "postgres.log").read_text())
            time.sleep(0.1)

    def stop(self) -> None:
        """A fast shutdown (SIGINT): what an operator's restart or a crash looks like to
        clients, whose connections are cut."""
        if self.process is not None and self.process.poll() is None:
            # The postmaster itself: runuser, its parent here, does not pass signals on.
            pid_file = self.data_dir / "postmaster.pid"
            if pid_file.exists():
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)
            else:
                self.process.terminate()
            self.process.wait(30)
        self.process = None


@contextmanager
def postgres() -> Iterator[Postgres]:
    bin_dir = postgres_bin_dir()
    workdir = Path(tempfile.mkdtemp(prefix="flaskchat-pg-"))
    data_dir = workdir / "data"
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres", "postgres")
    subprocess.run(as_database_user([str(bin_dir / "initdb"), "-D", str(data_dir), "-U",
                                     "postgres", "--auth=trust", "-E", "UTF8",
                                     "--no-sync"]),
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Postgres(bin_dir, data_dir, free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Redis:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@contextmanager
def redis_server() -> Iterator[Redis]:
    binary = shutil.which("redis-server")
    if binary is None:
        _unavailable("Redis is not installed (Debian: apt-get install redis-server)")
        raise AssertionError("unreachable")
    workdir = tempfile.mkdtemp(prefix="flaskchat-redis-")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no", "--dir", workdir],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()
        yield Redis(port, process)
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)

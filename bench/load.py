"""The load generator: one keep-alive HTTP/1.1 connection per simulated user, on gevent.

A deliberately small client (raw sockets, no HTTP library) so that the load costs as little
CPU as possible on a machine it shares with the servers it measures.
"""
from __future__ import annotations

import itertools
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import gevent
import gevent.event
from gevent import socket as gsocket

# How tokens are counted: the fast worker's tokens are " tok0", " tok1", ... The gateway may
# put several in one SSE event (those that arrived in one read), so its stream is counted by
# token text; a worker frame carries the cumulative text, so frames are counted instead.
SSE_TOKEN = b" tok"
EVENT_DELTA = b"event: response.output_text.delta"
_OUTPUT_TOKENS = re.compile(rb'"output_tokens":(\d+)')
FRAME_MARKER = b'"text":"'


@dataclass
class Sample:
    latency: float
    ttft: float | None
    tokens: int
    error: str | None = None


@dataclass
class Request:
    path: str
    body: bytes
    kind: str  # "json", "sse", "events" (the Responses API's named events) or "frames"
    headers: bytes = b""

    def wire(self, host: str) -> bytes:
        return (b"POST " + self.path.encode() + b" HTTP/1.1\r\nHost: " + host.encode() +
                b"\r\nContent-Type: application/json\r\nContent-Length: " +
                str(len(self.body)).encode() + b"\r\n" + self.headers + b"\r\n" + self.body)


class Connection:
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = gsocket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("connection closed")
        self.buffer += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def send(self, wire: bytes, request: Request) -> Sample:
        started = time.perf_counter()
        self.sock.sendall(wire)
        return self.receive(request, started)

    def receive(self, request: Request, started: float) -> Sample:
        status = self._line()
        chunked, length = False, 0
        while True:
            line = self._line()
            if not line:
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"content-length":
                length = int(value)
        ttft, tokens, tail = None, 0, b""
        # Named events repeat the whole text at the end: their tokens are the final usage's.
        marker = {"sse": SSE_TOKEN, "events": EVENT_DELTA}.get(request.kind, FRAME_MARKER)
        if chunked:
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    self._line()
                    break
                data = self._exactly(size)
                self._exactly(2)
                if request.kind != "json":
                    found = data.count(marker)
                    if found and ttft is None:
                        ttft = time.perf_counter() - started
                    tokens += found
                tail = (tail + data)[-4096:]
        else:
            tail = self._exactly(length)
        if request.kind == "events":
            counted = _OUTPUT_TOKENS.findall(tail)
            tokens = int(counted[-1]) if counted else 0
        latency = time.perf_counter() - started
        error = None
        if not status.startswith(b"HTTP/1.1 200"):
            error = status.decode(errors="replace")
        elif request.kind == "sse" and b'"error"' in tail:
            start = tail.find(b'"message":"')
            error = "error event: " + tail[start + 11:start + 91].decode(errors="replace")
        elif request.kind == "sse" and b"[DONE]" not in tail:
            error = "stream did not end with [DONE]"
        elif request.kind == "events" and b"event: response.completed" not in tail \
                and b"event: response.incomplete" not in tail:
            error = "stream did not end with response.completed (or .incomplete)"
        return Sample(latency, ttft, tokens, error)


@dataclass
class Outcome:
    samples: list[Sample] = field(default_factory=list)
    connect_errors: int = 0
    elapsed: float = 0.0


def _connect(host: str, port: int, timeout: float, outcome: Outcome) -> Connection | None:
    """A new connection, or None (counted in ``outcome``) if it cannot be opened."""
    try:
        return Connection(host, port, timeout)
    except OSError:
        outcome.connect_errors += 1
        return None


def run(host: str, port: int, request: Request | Sequence[Request], users: int,
        seconds: float, max_requests: int, timeout: float = 60.0,
        on_open: Callable[[int], None] | None = None) -> Outcome:
    """``users`` connections sending ``request`` back to back until the time or the count
    runs out; one warm-up request per connection is not counted. Several requests (one
    per API key, say): every send takes the next one, round the list."""
    outcome = Outcome()
    variants = [request] if isinstance(request, Request) else list(request)
    wires = [(variant.wire(f"{host}:{port}"), variant) for variant in variants]
    turn = itertools.cycle(wires)
    deadline = [0.0]
    budget = [max_requests]

    def user() -> None:
        connection = _connect(host, port, timeout, outcome)
        if connection is None:
            return
        try:
            connection.send(*next(turn))  # warm-up: pools, caches, first imports
            while time.perf_counter() < deadline[0] and budget[0] > 0:
                budget[0] -= 1
                try:
                    outcome.samples.append(connection.send(*next(turn)))
                except (OSError, ConnectionError, ValueError) as exc:
                    outcome.samples.append(Sample(0.0, None, 0, type(exc).__name__))
                    connection.close()
                    connection = Connection(host, port, timeout)
        except (OSError, ConnectionError, ValueError):
            outcome.connect_errors += 1
        finally:
            connection.close()

    deadline[0] = time.perf_counter() + seconds + 2.0  # warm-ups first, then the clock
    greenlets = [gevent.spawn(user) for _ in range(users)]
    gevent.sleep(0)
    started = time.perf_counter()
    deadline[0] = started + seconds
    gevent.joinall(greenlets, timeout=seconds + timeout + 10)
    outcome.elapsed = time.perf_counter() - started
    if on_open:
        on_open(users)
    return outcome


def hold(host: str, port: int, request: Request, streams: int, ramp_per_second: float,
         timeout: float, at_peak: Callable[[], None]) -> Outcome:
    """Opens ``streams`` long streams, ramping up, calls ``at_peak`` once all are open,
    and waits for them to finish."""
    outcome = Outcome()
    wire = request.wire(f"{host}:{port}")
    opened = [0]
    done = gevent.event.Event()

    def one() -> None:
        connection = _connect(host, port, timeout, outcome)
        if connection is None:
            return
        try:
            started = time.perf_counter()
            connection.sock.sendall(wire)
            opened[0] += 1
            if opened[0] == streams:
                done.set()
            outcome.samples.append(connection.receive(request, started))
        except (OSError, ConnectionError, ValueError) as exc:
            outcome.samples.append(Sample(0.0, None, 0, type(exc).__name__))
        finally:
            connection.close()

    started = time.perf_counter()
    greenlets = []
    for i in range(streams):
        greenlets.append(gevent.spawn(one))
        if ramp_per_second and i % 50 == 49:
            gevent.sleep(50 / ramp_per_second)
    done.wait(timeout)
    gevent.sleep(1.0)
    at_peak()
    gevent.joinall(greenlets, timeout=timeout)
    outcome.elapsed = time.perf_counter() - started
    return outcome

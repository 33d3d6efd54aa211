"""The HTTP/1.1 transport adapter against a raw socket server that sends exactly the bytes
a test scripts: chunked bodies split anywhere, sized and close-delimited bodies, keep-alive
reuse, stale connections, truncation, timeouts, refusals."""
from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Iterator

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from app.upstream.http import build_session, post_json

Script = Callable[[socket.socket, int], None]  # (connection, request number on it)


class RawServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/x"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        number = 0
        with conn:
            while _read_request(conn):
                self.script(conn, number)
                number += 1

    def close(self) -> None:
        self.listener.close()


def _read_request(conn: socket.socket) -> bool:
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            got = conn.recv(65536)
        except OSError:
            return False
        if not got:
            return False
        data += got
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += conn.recv(65536)
    return True


@pytest.fixture()
def session() -> Iterator[requests.Session]:
    session = build_session(4)
    yield session
    session.close()


@pytest.fixture()
def serve() -> Iterator[Callable[[Script], RawServer]]:
    servers: list[RawServer] = []

    def start(script: Script) -> RawServer:
        servers.append(RawServer(script))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def chunked(payload: bytes, sizes: list[int]) -> bytes:
    out, position = b"", 0
    for size in sizes:
        piece = payload[position:position + size]
        if piece:
            out += b"%x\r\n" % len(piece) + piece + b"\r\n"
        position += size
    if position < len(payload):
        out += b"%x\r\n" % (len(payload) - position) + payload[position:] + b"\r\n"
    return out + b"0\r\n\r\n"


HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=0, max_size=300), st.lists(st.integers(1, 50), max_size=8),
       st.lists(st.integers(1, 400), min_size=1, max_size=6))
def test_chunked_bodies_split_anywhere(payload: bytes, sizes: list[int],
                                       writes: list[int]) -> None:
    wire = HEAD + chunked(payload, sizes)

    def script(conn: socket.socket, number: int) -> None:
        position = 0
        for size in writes + [len(wire)]:
            conn.sendall(wire[position:position + size])
            position += size
            time.sleep(0.0005)
    server = RawServer(script)
    session = build_session(4)
    try:
        for _ in range(2):  # the second request reuses the connection
            response = post_json(session, server.url, {}, (2, 2), stream=True)
            assert b"".join(response.iter_content(chunk_size=None)) == payload
        assert server.connections == 1
    finally:
        session.close()
        server.close()


def test_sized_body_and_keep_alive(serve: Callable[[Script], RawServer],
                                   session: requests.Session) -> None:
    server = serve(lambda conn, n: conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Type: application/json\r\n\r\n"
        b'{"n": ' + str(n).encode() + b"}  "))
    bodies = [post_json(session, server.url, {"a": 1}, (2, 2)).json() for _ in range(3)]
    assert bodies == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert server.connections == 1


def test_connection_close_and_close_delimited_body(
        serve: Callable[[Script], RawServer], session: requests.Session) -> None:
    def script(conn: socket.socket, n: int) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        conn.shutdown(socket.SHUT_WR)
    server = serve(script)
    assert post_json(session, server.url, {}, (2, 2)).content == b"all of it"
    assert post_json(session, server.url, {}, (2, 2)).content == b"all of it"
    assert server.connections == 2


def test_stale_pooled_connection_is_retried(serve: Callable[[Script], RawServer],
                                            session: requests.Session) -> None:
    def script(conn: socket.socket, n: int) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        conn.shutdown(socket.SHUT_RDWR)  # keep-alive promised, then closed while idle
    server = serve(script)
    assert post_json(session, server.url, {}, (2, 2)).content == b"ok"
    time.sleep(0.05)
    assert post_json(session, server.url, {}, (2, 2)).content == b"ok"
    assert server.connections == 2


def test_truncated_chunked_body(serve: Callable[[Script], RawServer],
                                session: requests.Session) -> None:
    def script(conn: socket.socket, n: int) -> None:
        conn.sendall(HEAD + b"5\r\nhel")
        conn.shutdown(socket.SHUT_RDWR)
    server = serve(script)
    response = post_json(session, server.url, {}, (2, 2), stream=True)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        b"".join(response.iter_content(chunk_size=None))


def test_read_timeout_and_silent_server(serve: Callable[[Script], RawServer],
                                        session: requests.Session) -> None:
    server = serve(lambda conn, n: time.sleep(3))
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        post_json(session, server.url, {}, (2, 0.3))
    assert time.monotonic() - started < 2


def test_server_that_closes_without_answering(serve: Callable[[Script], RawServer],
                                              session: requests.Session) -> None:
    server = serve(lambda conn, n: conn.shutdown(socket.SHUT_RDWR))
    with pytest.raises(requests.exceptions.ConnectionError):
        post_json(session, server.url, {}, (2, 2))


def test_refused_connection(session: requests.Session) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(requests.exceptions.ConnectionError) as info:
        post_json(session, f"http://127.0.0.1:{port}/x", {}, (2, 2))
    assert not isinstance(info.value, requests.exceptions.Timeout)


def test_closing_early_drops_the_connection(serve: Callable[[Script], RawServer],
                                            session: requests.Session) -> None:
    def script(conn: socket.socket, n: int) -> None:
        conn.sendall(HEAD + b"3\r\nabc\r\n")
        time.sleep(0.5)
        try:
            conn.sendall(b"3\r\ndef\r\n0\r\n\r\n")
        except OSError:
            pass
    server = serve(script)
    response = post_json(session, server.url, {}, (2, 2), stream=True)
    assert next(response.iter_content(chunk_size=None)) == b"abc"
    response.close()
    assert post_json(session, server.url, {}, (2, 2)).content == b"abcdef"
    assert server.connections == 2  # the first was not put back half-read


def test_waiting_for_body_bytes_works_past_descriptor_1024(
        serve: Callable[[Script], RawServer], session: requests.Session) -> None:
    """A gateway with thousands of streams holds descriptors past select()'s limit."""
    import os

    def script(conn: socket.socket, n: int) -> None:
        conn.sendall(HEAD)
        time.sleep(0.4)
        conn.sendall(b"2\r\nhi\r\n0\r\n\r\n")
    server = serve(script)
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        response = post_json(session, server.url, {}, (2, 2), stream=True)
        assert response.raw._connection.sock.fileno() > 1024
        assert response.raw.wait_readable(0.1) is False
        assert response.raw.wait_readable(2) is True
        assert response.content == b"hi"
    finally:
        for fd in fillers:
            os.close(fd)

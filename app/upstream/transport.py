"""A requests transport adapter for plain-HTTP backends: HTTP/1.1 spoken directly on
pooled keep-alive sockets.

The gateway's backend calls are small JSON POSTs to a handful of hosts on a trusted
network. urllib3 and http.client spend most of a call's CPU on generality those calls do
not need (an email-parser header parse, a liveness poll before each reuse, retry and proxy
machinery): measured on the bench, this adapter makes a call about three times cheaper.
It is mounted on the Session for ``http://`` only; ``https://`` keeps requests' own
HTTPAdapter. Responses are ordinary ``requests.Response`` objects whose ``raw`` streams
the body, so ``iter_content``, ``content`` and ``close`` behave as usual; errors are
requests' exceptions.
"""
from __future__ import annotations

import socket
from collections import deque
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit

import requests
from requests.adapters import BaseAdapter
from requests.exceptions import ChunkedEncodingError, ConnectTimeout, ReadTimeout
from requests.models import PreparedRequest, Response
from requests.structures import CaseInsensitiveDict

READ_SIZE = 65536
MAX_HEAD = 65536
MAX_IDLE_PER_HOST = 1024


class HttpTransport(BaseAdapter):
    def __init__(self, max_idle: int = MAX_IDLE_PER_HOST) -> None:
        super().__init__()
        self._max_idle = max_idle
        self._idle: dict[tuple[str, int], deque[_Connection]] = {}
        self._routes: dict[str, tuple[str, int, bytes]] = {}

    def send(self, request: PreparedRequest, stream: bool = False, timeout: Any = None,
             verify: Any = True, cert: Any = None,
             proxies: Mapping[str, str] | None = None) -> Response:
        host, port, target = self._route(str(request.url))
        connect_timeout, read_timeout = _timeouts(timeout)
        body = _body_bytes(request.body)
        message = _request_head(str(request.method), target, host, port,
                                request.headers, len(body)) + body
        idle = self._idle.setdefault((host, port), deque())
        while True:
            reused = bool(idle)
            connection = idle.pop() if reused else \
                _Connection.open(host, port, connect_timeout, request)
            try:
                connection.sock.settimeout(read_timeout)
                connection.send(message, request)
                status, reason, headers = connection.read_head(request)
                break
            except _Stale:
                connection.close()  # the peer closed it while idle: nothing was processed
                if not reused:
                    raise requests.exceptions.ConnectionError(
                        "the server closed the connection without answering",
                        request=request) from None
            except BaseException:
                connection.close()
                raise
        raw = _Body(connection, headers, self, (host, port), request)
        response = Response()
        response.status_code = status
        response.reason = reason
        response.headers = CaseInsensitiveDict(headers)
        response.raw = raw
        response.url = str(request.url)
        response.request = request
        response.connection = self  # type: ignore[assignment]
        response.encoding = None
        if not stream:
            response.content  # reads the body, which returns the connection to the pool
        return response

    def release(self, key: tuple[str, int], connection: "_Connection") -> None:
        idle = self._idle.setdefault(key, deque())
        if len(idle) < self._max_idle:
            idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().close()

    def _route(self, url: str) -> tuple[str, int, bytes]:
        route = self._routes.get(url)
        if route is None:
            parts = urlsplit(url)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            route = (parts.hostname or "", parts.port or 80, target.encode())
            if len(self._routes) < 10_000:
                self._routes[url] = route
        return route


class _Stale(Exception):
    """A reused connection that the peer had closed (no byte of an answer came back)."""


class _Connection:
    __slots__ = ("sock", "buffer")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    @classmethod
    def open(cls, host: str, port: int, timeout: float | None,
             request: PreparedRequest) -> "_Connection":
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except socket.timeout:
            raise ConnectTimeout(f"connecting to {host}:{port} timed out",
                                 request=request) from None
        except OSError as exc:
            raise requests.exceptions.ConnectionError(
                f"could not connect to {host}:{port}: {exc}", request=request) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, message: bytes, request: PreparedRequest) -> None:
        try:
            self.sock.sendall(message)
        except socket.timeout:
            raise ReadTimeout("the server did not take the request in time",
                              request=request) from None
        except OSError:
            raise _Stale() from None  # a fresh connection then fails as "without answering"

    def fill(self, request: PreparedRequest) -> bool:
        try:
            data = self.sock.recv(READ_SIZE)
        except socket.timeout:
            raise ReadTimeout("the server did not answer in time", request=request) from None
        except OSError as exc:
            raise requests.exceptions.ConnectionError(
                f"connection lost: {exc}", request=request) from None
        self.buffer += data
        return bool(data)

    def read_head(self, request: PreparedRequest) -> tuple[int, str, dict[str, str]]:
        first = True
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > MAX_HEAD:
                raise requests.exceptions.ConnectionError("response head too large",
                                                          request=request)
            try:
                got = self.fill(request)
            except requests.exceptions.ConnectionError:
                if first and not self.buffer:
                    raise _Stale() from None
                raise
            if not got:
                if first and not self.buffer:
                    raise _Stale()
                raise requests.exceptions.ConnectionError(
                    "the server closed the connection mid-answer", request=request)
            first = False
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        try:
            _, code, *rest = lines[0].split(" ", 2)
            status = int(code)
        except ValueError:
            raise requests.exceptions.ConnectionError(
                f"bad status line {lines[0][:80]!r}", request=request) from None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip()] = value.strip()
        return status, rest[0] if rest else "", headers


class _Body:
    """The response body as requests' Response expects ``raw`` to behave."""

    def __init__(self, connection: _Connection, headers: Mapping[str, str],
                 transport: HttpTransport, key: tuple[str, int],
                 request: PreparedRequest) -> None:
        lowered = {k.lower(): v for k, v in headers.items()}
        self._connection: _Connection | None = connection
        self._transport = transport
        self._key = key
        self._request = request
        self._chunked = "chunked" in lowered.get("transfer-encoding", "").lower()
        length = lowered.get("content-length")
        self._remaining = int(length) if length is not None and not self._chunked else None
        self._reusable = "close" not in lowered.get("connection", "").lower() and \
            (self._chunked or self._remaining is not None)
        self.closed = False

    def stream(self, chunk_size: int | None = None,
               decode_content: bool = True) -> Iterator[bytes]:
        if self._connection is None:
            return
        if self._chunked:
            yield from self._chunks()
        elif self._remaining is not None:
            yield from self._sized()
        else:
            yield from self._until_close()

    def wait_readable(self, timeout: float) -> bool:
        """Whether body bytes are (or become within ``timeout``) available to read."""
        connection = self._connection
        if connection is None or connection.buffer:
            return True
        # A peek with a timeout, not select(): select() cannot watch descriptors past 1024,
        # and a gateway holding thousands of streams has many.
        sock = connection.sock
        previous = sock.gettimeout()
        sock.settimeout(timeout)
        try:
            sock.recv(1, socket.MSG_PEEK)
            return True
        except socket.timeout:
            return False
        except OSError:
            return True  # the next read reports what went wrong
        finally:
            sock.settimeout(previous)

    def set_timeout(self, seconds: float) -> None:
        """The longest wait for each later read (after a stream's first frame)."""
        if self._connection is not None:
            self._connection.sock.settimeout(seconds)

    def read(self, amount: int | None = None, decode_content: bool = True) -> bytes:
        return b"".join(self.stream())

    def _chunks(self) -> Iterator[bytes]:
        connection = self._require()
        while True:
            out: list[bytes] = []
            while True:  # every chunk already buffered goes out together
                line_end = connection.buffer.find(b"\r\n")
                if line_end < 0:
                    break
                try:
                    size = int(connection.buffer[:line_end].split(b";", 1)[0], 16)
                except ValueError:
                    raise ChunkedEncodingError("bad chunk size", request=self._request) \
                        from None
                if size == 0:
                    end = connection.buffer.find(b"\r\n\r\n", line_end)
                    if end < 0:
                        break  # the end of the (empty) trailer has not arrived yet
                    connection.buffer = connection.buffer[end + 4:]
                    if out:
                        yield b"".join(out)
                    self._finish()
                    return
                start = line_end + 2
                if len(connection.buffer) < start + size + 2:
                    break
                out.append(connection.buffer[start:start + size])
                connection.buffer = connection.buffer[start + size + 2:]
            if out:
                yield b"".join(out)
            self._more()

    def _sized(self) -> Iterator[bytes]:
        connection = self._require()
        assert self._remaining is not None
        while self._remaining > 0:
            if not connection.buffer:
                self._more()
            data = connection.buffer[:self._remaining]
            connection.buffer = connection.buffer[len(data):]
            self._remaining -= len(data)
            yield data
        self._finish()

    def _until_close(self) -> Iterator[bytes]:
        connection = self._require()
        while True:
            if connection.buffer:
                data, connection.buffer = connection.buffer, b""
                yield data
            if not connection.fill(self._request):
                self._finish()
                return

    def _require(self) -> _Connection:
        if self._connection is None:
            raise ChunkedEncodingError("the response was closed", request=self._request)
        return self._connection

    def _more(self) -> None:
        if not self._require().fill(self._request):
            self.close()
            raise ChunkedEncodingError("the server closed the connection mid-body",
                                       request=self._request)

    def _finish(self) -> None:
        connection, self._connection = self._connection, None
        self.closed = True
        if connection is not None:
            if self._reusable and not connection.buffer:
                self._transport.release(self._key, connection)
            else:
                connection.close()

    def close(self) -> None:
        """Before the end: the connection is closed (which cancels a generation)."""
        connection, self._connection = self._connection, None
        self.closed = True
        if connection is not None:
            connection.close()

    def release_conn(self) -> None:
        pass  # the connection goes back to the pool when the body has been read


def _timeouts(timeout: Any) -> tuple[float | None, float | None]:
    if isinstance(timeout, tuple):
        return timeout[0], timeout[1]
    return timeout, timeout


def _body_bytes(body: Any) -> bytes:
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return b"".join(body)


def _request_head(method: str, target: bytes, host: str, port: int,
                  headers: Mapping[str, str | bytes], length: int) -> bytes:
    lines = [method.encode(), b" ", target, b" HTTP/1.1\r\nHost: ", host.encode(), b":",
             str(port).encode(), b"\r\n"]
    for name, value in headers.items():
        if name.lower() != "content-length":
            encoded = value if isinstance(value, bytes) else value.encode("latin-1")
            lines += [name.encode("latin-1"), b": ", encoded, b"\r\n"]
    lines += [b"Content-Length: ", str(length).encode(), b"\r\n\r\n"]
    return b"".join(lines)

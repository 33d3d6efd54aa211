"""A requests transport adapter: HTTP/1.1 on pooled keep-alive sockets, framed by llhttp.

The gateway's backend calls are small JSON POSTs and long streams to a handful of hosts.
urllib3 and http.client spend most of a call's CPU on what those calls do not need (an
email-parser header parse, a liveness poll before each reuse, retry and proxy machinery);
this adapter keeps a call to one send and (usually) one read, and leaves the framing of
answers to llhttp, the parser Node and uvicorn use (see ``app.upstream.connection``;
``bench/parser_choice.py`` has what chose it over h11 and geventhttpclient's parser).

Mounted on the Session for ``http://`` and ``https://`` (TLS by the ssl module), so both
kinds of upstream stream the same way. Responses are ordinary ``requests.Response``
objects whose ``raw`` streams the body (decoding gzip and deflate), so ``iter_content``,
``content`` and ``close`` behave as usual; errors are requests' exceptions.

A request goes out once. A pooled connection is checked before it is reused, and one the
peer has closed is replaced; once a request is written, a failure is the caller's to see,
never a silent second send (a worker that died mid-generation must not get it again).
"""
from __future__ import annotations

import os
import socket
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

import requests
from requests.adapters import BaseAdapter
from requests.exceptions import ConnectTimeout, InvalidHeader, InvalidURL
from requests.models import PreparedRequest, Response
from requests.utils import DEFAULT_CA_BUNDLE_PATH

from app.upstream.connection import Body, Connection

MAX_IDLE_PER_HOST = 1024
MAX_ROUTES = 10_000
_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNSAFE_TARGET = frozenset(" \t\r\n\0")


@dataclass(frozen=True)
class _Route:
    tls: bool
    host: str  # as connected to (an IPv6 address without brackets)
    port: int
    target: bytes  # path and query
    host_header: bytes


class HttpTransport(BaseAdapter):
    def __init__(self, max_idle: int = MAX_IDLE_PER_HOST) -> None:
        super().__init__()
        self._max_idle = max_idle
        self._idle: dict[tuple[Any, ...], deque[Connection]] = {}
        self._routes: dict[str, _Route] = {}
        self._tls_contexts: dict[tuple[Any, Any], ssl.SSLContext] = {}

    def send(self, request: PreparedRequest, stream: bool = False, timeout: Any = None,
             verify: Any = True, cert: Any = None,
             proxies: Mapping[str, str] | None = None) -> Response:
        route = self._route(str(request.url), request)
        connect_timeout, read_timeout = _timeouts(timeout)
        body = _body_bytes(request.body)
        message = _request_head(str(request.method), route, request.headers, len(body)) + body
        key = (route.tls, route.host, route.port, verify, cert) if route.tls else \
            (False, route.host, route.port)
        connection = self._reusable(key) or \
            self._open(route, connect_timeout, verify, cert, request)
        connection.start(request, request.method == "HEAD")
        try:
            connection.sock.settimeout(read_timeout)
            connection.send(message)
            connection.read_head()
        except BaseException:
            connection.close()
            raise
        response = Response()
        response.status_code = connection.status
        response.reason = connection.reason
        response.headers = connection.header_dict()
        response.raw = Body(connection, lambda done: self.release(key, done))
        response.url = str(request.url)
        response.request = request
        response.connection = self  # type: ignore[assignment]
        response.encoding = None
        if not stream:
            response.content  # reads the body, which returns the connection to the pool
        return response

    def release(self, key: tuple[Any, ...], connection: Connection) -> None:
        idle = self._idle.setdefault(key, deque())
        if len(idle) < self._max_idle:
            idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().close()

    def _reusable(self, key: tuple[Any, ...]) -> Connection | None:
        """The most recently used idle connection that the peer has not closed."""
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.usable():
                return connection
            connection.close()
        return None

    def _open(self, route: _Route, timeout: float | None, verify: Any, cert: Any,
              request: PreparedRequest) -> Connection:
        where = f"{route.host}:{route.port}"
        try:
            sock = socket.create_connection((route.host, route.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if route.tls:
                try:
                    sock = self._tls_context(verify, cert).wrap_socket(
                        sock, server_hostname=route.host)
                except BaseException:
                    sock.close()
                    raise
        except socket.timeout:
            raise ConnectTimeout(f"connecting to {where} timed out", request=request) \
                from None
        except ssl.SSLError as exc:
            raise requests.exceptions.SSLError(f"TLS with {where} failed: {exc}",
                                               request=request) from None
        except OSError as exc:
            raise requests.exceptions.ConnectionError(
                f"could not connect to {where}: {exc}", request=request) from None
        return Connection(sock, route.tls)

    def _tls_context(self, verify: Any, cert: Any) -> ssl.SSLContext:
        """One context per (verify, cert) setting, as requests' HTTPAdapter interprets
        them: True (certifi's bundle), a CA file or directory, or False."""
        context = self._tls_contexts.get((verify, cert))
        if context is None:
            context = ssl.create_default_context()
            if verify is False:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            elif isinstance(verify, str) and os.path.isdir(verify):
                context.load_verify_locations(capath=verify)
            elif isinstance(verify, str):
                context.load_verify_locations(cafile=verify)
            else:
                context.load_verify_locations(cafile=DEFAULT_CA_BUNDLE_PATH)
            if cert:
                certfile, keyfile = (cert, None) if isinstance(cert, str) else cert
                context.load_cert_chain(certfile, keyfile)
            self._tls_contexts[(verify, cert)] = context
        return context

    def _route(self, url: str, request: PreparedRequest) -> _Route:
        route = self._routes.get(url)
        if route is None:
            route = _parse_route(url, request)
            if len(self._routes) < MAX_ROUTES:
                self._routes[url] = route
        return route


def _parse_route(url: str, request: PreparedRequest) -> _Route:
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise InvalidURL(f"not an http(s) URL: {url!r}", request=request)
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise InvalidURL(f"bad port in {url!r}", request=request) from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname
    if _UNSAFE_TARGET.intersection(target + host) or not (target + host).isascii():
        raise InvalidURL(f"not a plain ASCII URL: {url!r}", request=request)
    shown = f"[{host}]" if ":" in host else host  # an IPv6 address
    if port != _DEFAULT_PORTS[parts.scheme]:
        shown += f":{port}"
    return _Route(parts.scheme == "https", host, port, target.encode(), shown.encode())


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


def _request_head(method: str, route: _Route, headers: Mapping[str, str | bytes],
                  length: int) -> bytes:
    lines = [method.encode("ascii"), b" ", route.target, b" HTTP/1.1\r\nHost: ",
             route.host_header, b"\r\n"]
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in ("content-length", "transfer-encoding"):
            continue
        text = value if isinstance(value, str) else value.decode("latin-1")
        if _unsafe(name, text):
            raise InvalidHeader(f"Invalid leading whitespace, reserved character(s), or "
                                f"return character(s) in header {name!r}")
        if lowered == "host":  # the caller's own Host replaces ours
            lines[3:6] = [b" HTTP/1.1\r\n"]
        lines += [name.encode("latin-1"), b": ", text.encode("latin-1"), b"\r\n"]
    lines += [b"Content-Length: ", str(length).encode(), b"\r\n\r\n"]
    return b"".join(lines)


def _unsafe(name: str, value: str) -> bool:
    """requests' rules for a header (a CR or LF would put another header on the wire),
    plus NUL: no name that is empty, starts with a space or holds a colon or a line break;
    no value that starts with a space or holds a line break. (On str: ``in`` on bytes
    first tries the needle as an integer, and raises and clears an error doing so.)"""
    return (not name or name[0].isspace() or ":" in name or "\r" in name or "\n" in name
            or "\0" in name or value[:1].isspace() or "\r" in value or "\n" in value
            or "\0" in value)

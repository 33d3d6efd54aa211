"""One pooled HTTP/1.1 connection: it writes a request and reads the answer with llhttp
(through ``httptools``), and hands the body out as requests' ``Response.raw``.

llhttp does the framing: interim 1xx answers, bodiless statuses, chunked and sized bodies,
and the refusal of ambiguous or malformed heads (two Content-Lengths, a length beside
chunked, a bad length, a line without a colon, an obs-fold). The parser lives as long as
the connection, since llhttp reads one answer after another on it; the connection itself
receives its callbacks, so a call allocates no parser, no callback objects and no state
object of its own.
"""
from __future__ import annotations

import _socket
import socket
import zlib
from typing import Any, Callable, Iterator

import httptools
import requests
from requests.exceptions import ChunkedEncodingError, ContentDecodingError, ReadTimeout
from requests.models import PreparedRequest
from requests.structures import CaseInsensitiveDict

READ_SIZE = 65536
MAX_HEAD = 65536  # bytes of an answer's head
MAX_STALL = 65536  # body bytes read without llhttp completing anything (a chunk-size line)
_DECODED = (b"gzip", b"x-gzip", b"deflate")  # content codings the body reader undoes
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)  # Linux: struct tcp_info
_TCP_ESTABLISHED = 1  # its first byte, tcpi_state


class InvalidResponse(requests.exceptions.RequestException):
    """The server's answer breaks HTTP/1.1 (a malformed or ambiguous head)."""


class _Stop(Exception):
    """Raised in a callback to stop llhttp: at the end of a HEAD answer's head (no body
    follows, whatever the headers say, and httptools cannot tell llhttp to skip it), or at
    the start of a second answer nobody asked for."""


class Connection:
    """A socket, its parser, and the state of the answer being read on it."""

    __slots__ = ("sock", "tls", "_view", "_parser", "request", "head_only", "status",
                 "reason", "names", "values", "head_done", "complete", "eof", "reusable",
                 "until_close", "encoding", "pending", "_fed", "_progressed", "failure")

    def __init__(self, sock: socket.socket, tls: bool) -> None:
        self.sock = sock
        self.tls = tls
        # A plain view of the descriptor for a non-blocking peek: a gevent socket's own
        # recv would wait instead of failing. Detached before the socket closes.
        self._view = _socket.socket(fileno=sock.fileno())
        self._parser = httptools.HttpResponseParser(self)
        self.names: list[bytes] = []  # the final head's header names and values, in order
        self.values: list[bytes] = []
        self.pending: list[bytes] = []  # body bytes parsed and not yet handed out
        self.start(None, False)  # type: ignore[arg-type]

    def start(self, request: PreparedRequest, head_only: bool) -> None:
        """Forgets the last answer; the next one is to ``request``."""
        self.request = request
        self.head_only = head_only
        self.status = 0
        self.reason = ""
        self.names.clear()
        self.values.clear()
        self.pending.clear()
        self.head_done = False  # the final (non-1xx) head has been read
        self.complete = False  # the whole answer has been read
        self.eof = False  # the peer closed its side
        self.reusable = False  # complete, keep-alive, and nothing after it
        self.until_close = False  # the body ends with the connection
        self.encoding = ""  # gzip or deflate, when the body is so encoded
        self._fed = 0  # head bytes, then body bytes without a parse event
        self._progressed = False
        self.failure: requests.RequestException | None = None  # met while reading the head

    def close(self) -> None:
        self._view.detach()
        try:
            self.sock.close()
        except OSError:
            pass

    def usable(self) -> bool:
        """For an idle pooled connection: the peer has not closed or reset it. On Linux
        its TCP state says so without a read (a FIN puts it in CLOSE_WAIT, a reset in
        CLOSE); elsewhere a non-blocking peek does."""
        if self.tls and self.sock.pending():  # type: ignore[attr-defined]
            return False
        if _TCP_INFO is not None:
            try:
                return self.sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0] == \
                    _TCP_ESTABLISHED
            except OSError:
                return False
        try:
            self._view.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            return False  # end of stream, or bytes nobody asked for
        except BlockingIOError:
            return True
        except OSError:
            return False

    # ---- writing and reading -------------------------------------------------------------

    def send(self, message: bytes) -> None:
        try:
            self.sock.sendall(message)
        except socket.timeout:
            raise ReadTimeout("the server did not take the request in time",
                              request=self.request) from None
        except OSError as exc:
            raise requests.exceptions.ConnectionError(
                f"the connection failed while sending: {exc}", request=self.request) \
                from None

    def read_head(self) -> None:
        first = True
        while not self.head_done and not self.complete:
            data = self._recv()
            if not data:
                raise requests.exceptions.ConnectionError(
                    "the server closed the connection without answering" if first else
                    "the server closed the connection in the middle of its answer",
                    request=self.request)
            first = False
            try:
                self.feed(data)
            except ChunkedEncodingError as exc:
                # The head is fine; the body that came with it is not. Its reader will
                # see the error once the good part before it has been taken.
                self.failure = exc

    def receive(self) -> None:
        """Reads once more from the socket (after the head)."""
        data = self._recv()
        if data:
            self.feed(data)
            return
        self.eof = True
        if self.until_close:
            self.complete = True
            self.reusable = False

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(READ_SIZE)
        except socket.timeout:
            raise ReadTimeout("the server did not answer in time", request=self.request) \
                from None
        except OSError as exc:
            raise requests.exceptions.ConnectionError(f"connection lost: {exc}",
                                                      request=self.request) from None

    def feed(self, data: bytes) -> None:
        self._progressed = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Stop):
                self.complete = True
                self.reusable = False  # where the answer ended in this read is not known
                return
            if isinstance(exc.__context__, requests.RequestException):
                raise exc.__context__ from None
            raise self._invalid(str(exc)) from None
        except httptools.HttpParserError as exc:
            raise self._invalid(str(exc)) from None
        if not self.head_done:
            self._fed += len(data)
            if self._fed > MAX_HEAD:
                raise self._invalid(f"a response head over {MAX_HEAD} bytes")
        elif self._progressed or self.complete:
            self._fed = 0
        else:
            self._fed += len(data)
            if self._fed > MAX_STALL:
                raise self._invalid(f"{MAX_STALL} bytes without a complete chunk-size line")

    def _invalid(self, why: str) -> requests.RequestException:
        if self.head_done:  # in the body: requests' error for a broken body
            return ChunkedEncodingError(f"invalid response body: {why}", request=self.request)
        return InvalidResponse(f"invalid HTTP response: {why}", request=self.request)

    def header_dict(self) -> CaseInsensitiveDict[str]:
        names = [name.decode("latin-1") for name in self.names]
        values = [value.decode("latin-1") for value in self.values]
        headers: CaseInsensitiveDict[str] = CaseInsensitiveDict(dict(zip(names, values)))
        if len(headers) < len(names):  # a name came more than once: join its values
            headers = CaseInsensitiveDict()
            for name, value in zip(names, values):
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return headers

    # ---- llhttp's callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise _Stop()  # a second answer to one request: not ours, not reusable

    def on_status(self, reason: bytes) -> None:
        self.reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.names.append(name)
        self.values.append(value)

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101:
                raise InvalidResponse("the server switched protocols (HTTP 101)")
            return  # an interim answer; the final one follows
        self.status = status
        self.head_done = True
        self.reusable = self._parser.should_keep_alive()
        sized = chunked = False
        for name, value in zip(self.names, self.values):
            lowered = name.lower()
            if lowered == b"content-length":
                sized = True
            elif lowered == b"transfer-encoding":
                chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
            elif lowered == b"content-encoding":
                coding = value.strip().lower()
                self.encoding = coding.decode() if coding in _DECODED else ""
        self.until_close = not sized and not chunked and status not in (204, 304)
        if self.head_only:
            raise _Stop()

    def on_body(self, body: bytes) -> None:
        self.pending.append(body)
        self._progressed = True

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True
        else:  # the end of an interim answer: forget its headers
            self.names.clear()
            self.values.clear()
            self.reason = ""

    on_chunk_header = on_chunk_complete = None  # looked up by httptools; not needed


class Body:
    """The response body as requests' Response expects ``raw`` to behave, plus what the
    upstream stream object needs: ``wait`` (a read with a timeout) and ``set_timeout``.
    When the body has been read, ``release`` gets the connection back (if it can carry
    another request), else it is closed."""

    __slots__ = ("_connection", "_release", "_request", "_encoding", "_leftover", "closed")

    def __init__(self, connection: Connection,
                 release: Callable[[Connection], None]) -> None:
        self._connection: Connection | None = connection
        self._release = release
        self._request = connection.request
        self._encoding = connection.encoding
        self._leftover = bytearray()  # what read(amount) took but did not return
        self.closed = False

    def stream(self, chunk_size: int | None = None,
               decode_content: bool = True) -> Iterator[bytes]:
        """What each socket read brought, as one piece (every chunk already there goes
        out together)."""
        inflater = _Inflater(self._encoding) if decode_content and self._encoding else None
        while True:
            data = self._next()
            if data is None:
                break
            if inflater is not None:
                data = inflater.feed(data, self._request)
            yield data  # even b"" (a partial gzip block): a read happened
        if inflater is not None:
            tail = inflater.flush()
            if tail:
                yield tail

    def read(self, amount: int | None = None, decode_content: bool = True) -> bytes:
        pieces = self.stream(decode_content=decode_content)
        if amount is None:
            data = bytes(self._leftover) + b"".join(pieces)
            self._leftover.clear()
            return data
        while len(self._leftover) < amount:
            piece = next(pieces, None)
            if piece is None:
                break
            self._leftover += piece
        data = bytes(self._leftover[:amount])
        del self._leftover[:amount]
        return data

    def wait(self, timeout: float) -> bool:
        """Whether body bytes (or its end) can be taken without waiting, after one read of
        at most ``timeout`` seconds."""
        connection = self._connection
        if connection is None or connection.pending or connection.complete \
                or connection.eof or connection.failure is not None:
            return True
        sock = connection.sock
        previous = sock.gettimeout()
        sock.settimeout(timeout)
        try:
            connection.receive()
        except ReadTimeout:
            return False
        finally:
            sock.settimeout(previous)
        return bool(connection.pending) or connection.complete or connection.eof

    def set_timeout(self, seconds: float) -> None:
        """The longest wait for each later read (after a stream's first frame)."""
        if self._connection is not None:
            self._connection.sock.settimeout(seconds)

    def _next(self) -> bytes | None:
        """The body bytes parsed so far and not yet handed out; None at the end."""
        connection = self._connection
        if connection is None:
            if self.closed:
                return None
            raise ChunkedEncodingError("the response was closed", request=self._request)
        try:
            while not connection.pending:
                if connection.failure is not None:
                    raise connection.failure
                if connection.complete:
                    self._finish()
                    return None
                if connection.eof:
                    raise ChunkedEncodingError("the server closed the connection mid-body",
                                               request=self._request)
                connection.receive()
        except BaseException:
            self.close()
            raise
        pending = connection.pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        return data

    def _finish(self) -> None:
        connection, self._connection = self._connection, None
        self.closed = True
        if connection is not None:
            if connection.reusable:
                self._release(connection)
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


class _Inflater:
    """gzip or deflate (zlib-wrapped, or raw as some servers send it), incrementally."""

    def __init__(self, encoding: str) -> None:
        self._gzip = encoding in ("gzip", "x-gzip")
        self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS if self._gzip else
                                           zlib.MAX_WBITS)
        self._first = True

    def feed(self, data: bytes, request: Any) -> bytes:
        try:
            try:
                out = self._decoder.decompress(data)
            except zlib.error:
                if not self._first or self._gzip:
                    raise
                self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
                out = self._decoder.decompress(data)
        except zlib.error as exc:
            coding = "gzip" if self._gzip else "deflate"
            raise ContentDecodingError(f"cannot decode the {coding} body: {exc}",
                                       request=request) from None
        self._first = False
        return out

    def flush(self) -> bytes:
        return self._decoder.flush()

"""What each candidate HTTP/1.1 parser costs for the gateway's typical backend answers:
a 1 KB JSON answer in one read, a 32-frame chunked stream in 34 reads, and a 16 MiB
chunked body in 64 KiB chunks. Decided the transport's parser (issue 12).

    pip install httptools h11 geventhttpclient && python bench/parser_choice.py

Not part of the tests; a candidate that is not installed is skipped.
"""
from __future__ import annotations

import importlib.util
import time
from typing import Any, Callable

HEAD = (b"HTTP/1.1 200 OK\r\ndate: Sat, 28 Nov 2026 06:00:00 GMT\r\nserver: uvicorn\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n")
BODY = b'{"text": "' + b"x" * 900 + b'", "error_code": 0, "finish_reason": "stop"}'
SIMPLE = [HEAD % len(BODY) + BODY]
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\ndate: Sat, 28 Nov 2026 06:00:00 GMT\r\nserver: uvicorn\r\n"
               b"content-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n")
FRAMES = [b'{"text": "' + b"y" * (10 * i) + b'", "error_code": 0, "finish_reason": null}\0'
          for i in range(32)]
STREAM = [STREAM_HEAD] + [b"%x\r\n" % len(f) + f + b"\r\n" for f in FRAMES] + [b"0\r\n\r\n"]
LARGE = [STREAM_HEAD] + [b"10000\r\n" + b"z" * 65536 + b"\r\n" for _ in range(256)] \
    + [b"0\r\n\r\n"]


def with_httptools(pieces: list[bytes]) -> None:
    import httptools

    class Protocol:
        def __init__(self) -> None:
            self.headers: list[tuple[bytes, bytes]] = []
            self.body: list[bytes] = []
            self.done = False

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            self.done = True

    protocol = Protocol()
    parser = httptools.HttpResponseParser(protocol)
    for piece in pieces:
        parser.feed_data(piece)
    assert protocol.done


def with_h11(pieces: list[bytes]) -> None:
    import h11

    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method="POST", target="/x",
                                headers=[("Host", "a"), ("Content-Length", "2")]))
    connection.send(h11.Data(data=b"{}"))
    connection.send(h11.EndOfMessage())
    body = []
    for piece in pieces:
        connection.receive_data(piece)
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                break
            if isinstance(event, h11.Data):
                body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return


def with_geventhttpclient(pieces: list[bytes]) -> None:
    from geventhttpclient._parser import HTTPResponseParser

    class Parser(HTTPResponseParser):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.fields: list[str] = []
            self.body: list[bytes] = []
            self.done = False

        def _on_header_field(self, text: str) -> None:
            self.fields.append(text)

        def _on_header_value(self, text: str) -> None:
            self.fields.append(text)

        def _on_headers_complete(self) -> bool:
            return False

        def _on_body(self, body: Any) -> None:
            self.body.append(bytes(body))

        def _on_message_complete(self) -> None:
            self.done = True

        def _on_message_begin(self) -> None:
            pass

        def _on_status(self, text: str) -> None:
            pass

    parser = Parser()
    for piece in pieces:
        parser.feed(piece)
    assert parser.done


def per_run(parse: Callable[[list[bytes]], None], pieces: list[bytes], runs: int) -> float:
    parse(pieces)
    started = time.process_time()
    for _ in range(runs):
        parse(pieces)
    return (time.process_time() - started) / runs


def main() -> None:
    print("| parser | 1 KB JSON answer | 32-frame stream | 16 MiB chunked |")
    print("|---|---|---|---|")
    for module, parse in (("httptools", with_httptools), ("h11", with_h11),
                          ("geventhttpclient", with_geventhttpclient)):
        if importlib.util.find_spec(module) is None:
            print(f"| {module} | not installed | | |")
            continue
        print(f"| {module} | {per_run(parse, SIMPLE, 20000) * 1e6:.1f} us "
              f"| {per_run(parse, STREAM, 3000) * 1e6:.1f} us "
              f"| {per_run(parse, LARGE, 10) * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()

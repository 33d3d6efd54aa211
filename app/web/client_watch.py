"""Noticing a client that went away while its request waits on a worker.

gunicorn hands the client's socket to the app as ``environ["gunicorn.socket"]``. A
non-blocking peek tells an orderly close (zero bytes) from silence; it is made on a plain
``_socket`` view of the descriptor, because gevent's socket would wait instead of failing.
"""
from __future__ import annotations

import _socket
import socket
from typing import Any, Callable, Mapping


def watcher(environ: Mapping[str, Any]) -> Callable[[], bool]:
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return _never
    fileno = sock.fileno()

    def client_gone() -> bool:
        view = _socket.socket(fileno=fileno)
        try:
            return view.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False  # still connected, nothing sent
        except OSError:
            return True  # reset, or the descriptor is gone
        finally:
            view.detach()
    return client_gone


def _never() -> bool:
    return False

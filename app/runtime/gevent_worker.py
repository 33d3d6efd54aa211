"""gunicorn's gevent worker, with a stop that drops no request.

A stop (SIGTERM, and the old workers of a SIGHUP reload) goes in four steps:

1. Drain, for ``drain_seconds``: the process keeps accepting (the new workers of a reload
   boot meanwhile, so new connections never wait on a listener nobody serves), /ready
   answers 503, and every response goes out with ``Connection: close``, so that a busy
   client's next request is answered and then its connection closes cleanly.
2. Then it stops accepting; requests and streams in progress run on. In a full stop (the
   arbiter has closed its copy of the listening socket: no process will accept after
   this one), the socket first drops new connection attempts and the backlog is accepted
   and served: closing a listening socket resets the connections waiting in its backlog,
   and a proxy that has sent one a request answers 502 (nginx does not resend a POST).
   A dropped attempt is retried by its client a second later, finds the socket closed,
   and goes to another gateway. A kept-alive
   connection that waits for its next request is closed once it has waited through the
   drain window and no request has begun on it (no byte waiting in the socket, none
   received since it went idle): never one a request is being read from. Nothing is ever
   thrown into a greenlet that waits for a request: gunicorn's worker (and ours before)
   killed such greenlets with their keep-alive timeout, which gevent delivers later, so
   a request that had arrived in between was cut by a stray timeout.
3. ``END_MARGIN`` seconds before ``graceful_timeout`` (when the arbiter kills), what still
   runs is ended: a stream with an error event and ``[DONE]``, a request with a 503.
4. The process exits.

Loaded by gunicorn's arbiter by name (``app.runtime.gevent_worker.GeventWorker``); imports
gevent but nothing that must be imported after monkey-patching.
"""
from __future__ import annotations

import _socket
import ctypes
import os
import socket
import struct
import time
from functools import partial
from typing import Any

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn.sock import ssl_context
from gunicorn.workers.ggevent import GeventWorker as _GunicornGeventWorker

from app.runtime import collector

DEFAULT_DRAIN_SECONDS = 2.0
END_MARGIN = 2.0  # seconds before graceful_timeout: ending streams with an event takes time
SWEEP_SECONDS = 0.25  # how often a stopping worker looks for idle connections to close
BACKLOG_SECONDS = 0.2  # accepting what waits in the backlog once new attempts are dropped
SO_ATTACH_FILTER = 26  # Linux's setsockopt for a classic BPF filter
_DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)  # BPF "ret #0": keep no byte of any packet
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)
_LAST_DATA_RECV = struct.Struct("=I")  # struct tcp_info: ms since the last data, offset 52


class GeventWorker(_GunicornGeventWorker):  # type: ignore[misc]
    def init_process(self) -> None:
        self._clients: dict[Any, _Client] = {}  # connection greenlet -> its client
        self._stop_began: float | None = None
        super().init_process()

    # ---- serving ------------------------------------------------------------------------

    def run(self) -> None:
        collector.settle_after_start_up()  # the app is loaded: init_process loaded it
        servers = [self._serve(listener) for listener in self.sockets]
        while self.alive:
            self.notify()
            gevent.sleep(1.0)
        try:
            self._stop(servers)
        finally:
            ours = _lifecycle(self)
            if ours is not None:
                ours.stopped()

    def _serve(self, listener: Any) -> StreamServer:
        """As gunicorn's worker does (its run() also stops them, which _stop does here)."""
        listener.setblocking(1)
        options = {"ssl_context": ssl_context(self.cfg)} if self.cfg.is_ssl else {}
        server = StreamServer(listener, handle=partial(self.handle, listener),
                              spawn=Pool(self.worker_connections), **options)
        if self.cfg.workers > 1:
            server.max_accept = 1
        server.start()
        return server

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        me = gevent.getcurrent()
        self._clients[me] = _Client(client)
        try:
            super().handle(listener, client, addr)
        finally:
            self._clients.pop(me, None)

    def timeout_ctx(self) -> "_IdleWait":
        """The wait for a connection's next request (``keepalive`` seconds, then the
        connection closes), marked as such while it lasts."""
        return _IdleWait(self._clients.get(gevent.getcurrent()), self.cfg.keepalive)

    # ---- stopping -----------------------------------------------------------------------

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)  # alive = False: responses get Connection: close
        if self._stop_began is None:
            self._stop_began = time.monotonic()
            draining = _lifecycle(self)
            if draining is not None:
                draining.begin_drain()

    def _stop(self, servers: list[StreamServer]) -> None:
        from app.errors import ServerStopping

        began = self._stop_began or time.monotonic()
        ours = _lifecycle(self)
        drain = ours.drain_seconds if ours is not None else DEFAULT_DRAIN_SECONDS
        deadline = began + max(self.cfg.graceful_timeout - END_MARGIN, drain)
        self._sleep_until(began + drain, servers, sweep=None)
        closing = [listener for listener in self.sockets if not _arbiter_holds(listener)]
        if [_drop_new_connections(listener) for listener in closing]:
            self._sleep_until(time.monotonic() + BACKLOG_SECONDS, servers, sweep=None)
        for server in servers:
            server.close()  # stop accepting; the connections it has go on
        self._sleep_until(deadline, servers, sweep=(began, drain))
        if not self._busy(servers):
            return
        self.log.warning("graceful timeout: ending %d unfinished request(s)",
                         sum(1 for c in self._clients.values() if c.idle_since is None))
        for greenlet, client in list(self._clients.items()):
            if client.idle_since is None:  # in a request: a 503, or an error event
                greenlet.kill(ServerStopping("The server is stopping and could not finish "
                                             "this request in time; retry it.",
                                             headers={"Retry-After": "1"}), block=False)
        self._sleep_until(time.monotonic() + END_MARGIN / 2, servers, sweep=(began, drain))
        for server in servers:
            server.stop(timeout=1)

    def _sleep_until(self, until: float, servers: list[StreamServer],
                     sweep: tuple[float, float] | None) -> None:
        while time.monotonic() < until and (sweep is None or self._busy(servers)):
            if sweep is not None:
                self._close_idle(*sweep)
            self.notify()
            gevent.sleep(min(SWEEP_SECONDS, max(until - time.monotonic(), 0)))

    @staticmethod
    def _busy(servers: list[StreamServer]) -> bool:
        return any(server.pool.free_count() != server.pool.size for server in servers)

    def _close_idle(self, stop_began: float, drain: float) -> None:
        """Closes the kept-alive connections that have waited through the drain window
        (counted from when they went idle, or from the stop) with no request begun."""
        now = time.monotonic()
        for client in list(self._clients.values()):
            idle_since = client.idle_since
            if idle_since is None:
                continue
            waited = now - max(idle_since, stop_began)
            if waited >= drain and not client.request_begun(now - idle_since):
                client.close()


def _arbiter_holds(listener: Any) -> bool:
    """Whether the arbiter still has this listening socket open (a reload, or one worker
    of several stopping: other workers will accept). Linux's /proc says; where it cannot,
    the answer is yes, and the socket is closed as before."""
    try:
        target = f"socket:[{os.fstat(listener.fileno()).st_ino}]"
        folder = f"/proc/{os.getppid()}/fd"
        for fd in os.listdir(folder):
            try:
                if os.readlink(os.path.join(folder, fd)) == target:
                    return True
            except OSError:
                continue
        return False
    except OSError:
        return True


def _drop_new_connections(listener: Any) -> bool:
    """Makes the kernel drop every new connection attempt (SYN) to this listening socket;
    what has connected already waits in the backlog to be accepted."""
    program = ctypes.create_string_buffer(_DROP_ALL)
    fprog = struct.pack("HL", 1, ctypes.addressof(program))
    try:
        listener.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        return True
    except OSError:
        return False


def _lifecycle(worker: GeventWorker) -> Any:
    """The app's Lifecycle (None while the worker boots). Imported here, in the worker:
    what gunicorn's arbiter imports (it loads this module) a reload cannot renew."""
    from app.web import lifecycle

    return lifecycle.of(getattr(worker, "wsgi", None))


class _Client:
    """A client connection: its socket, and since when it waits for its next request."""

    __slots__ = ("sock", "idle_since")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.idle_since: float | None = None

    def request_begun(self, idle_for: float) -> bool:
        """Whether bytes of a request wait in the socket, or arrived since it went idle
        (a request head being read)."""
        try:
            fileno = self.sock.fileno()
            if getattr(self.sock, "pending", lambda: 0)():  # TLS: decrypted, unread
                return True
            view = _socket.socket(fileno=fileno)
            try:
                if view.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    return True
                return False  # the client closed its side: nothing is coming
            except BlockingIOError:
                pass
            finally:
                view.detach()
            if _TCP_INFO is None:
                return False
            info = self.sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 56)
            since_data_ms: int = _LAST_DATA_RECV.unpack_from(info, 52)[0]
            return since_data_ms < idle_for * 1000
        except OSError:
            return False  # the socket is gone: closing it is harmless

    def close(self) -> None:
        """Ends the connection: its greenlet, blocked reading the next request, sees the
        end of the stream and finishes on its own. (Through a plain view of the descriptor:
        gevent's own shutdown() would wake the reader with an error instead.)"""
        try:
            view = _socket.socket(fileno=self.sock.fileno())
        except OSError:
            return
        try:
            view.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            view.detach()


class _IdleWait:
    """gunicorn's keep-alive timeout around the wait for a connection's next request, and
    the mark that tells a stop this connection is idle. (A class: it runs once a request,
    and a generator-based context manager costs four times as much.)"""

    __slots__ = ("_client", "_timeout")

    def __init__(self, client: _Client | None, seconds: float) -> None:
        self._client = client
        self._timeout = gevent.Timeout(seconds, False)  # False: expiry just ends the wait

    def __enter__(self) -> None:
        if self._client is not None:
            self._client.idle_since = time.monotonic()
        self._timeout.start()

    def __exit__(self, kind: Any, exc: object, traceback: Any) -> bool:
        self._timeout.close()
        if self._client is not None:
            self._client.idle_since = None
        return exc is self._timeout  # the keep-alive timeout ran out: the wait just ends

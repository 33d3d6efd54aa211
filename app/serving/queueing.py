"""A request's line for a model server's slots: where the server's capacity is known
(its worker says, ``--model-capacity``, or the upstream's ``max_concurrency``), the
request waits in the gateway for a slot (``app.scheduling``) before it is sent; the
request's end gives the slot back (``app.web.request_end``)."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from app.scheduling.slots import Lines, Place
from app.serving.call import Call

K = TypeVar("K")

# Who waits where admission did not say (no key check on this path): one tenant.
ANONYMOUS = Place("anonymous", 1.0, "default", 0.0)


class CallQueue(Generic[K]):
    """``server(key)``: the server's name and its capacity (None: not known, no line)."""

    def __init__(self, slots: Lines, call: Call,
                 server: Callable[[K], tuple[str, int | None]]) -> None:
        self._slots = slots
        self._call = call
        self._server = server

    def wait(self, key: K, retry: bool) -> None:
        name, capacity = self._server(key)
        if capacity is None:
            return
        call = self._call
        held = self._slots.take(name, call.model, capacity, call.place or ANONYMOUS,
                                call.client_gone, retry)
        call.queued = True
        call.queue_seconds += held.waited
        call.held = held

    def leave(self) -> None:
        self._call.release_slot(None)

    def down(self, key: K) -> None:
        self._slots.server_failed(self._server(key)[0])

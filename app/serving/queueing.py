"""A request's line for a model server's slots: where the server's capacity is known
(its worker says, ``--model-capacity``, or the upstream's ``max_concurrency``), the
request waits in the gateway for a slot (``app.scheduling``) before it is sent; the
request's end gives the slot back (``app.web.request_end``)."""
from __future__ import annotations

import time
from typing import Any, Callable, Generic, TypeVar

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
        self._held: Any = None  # the slot this line gave (one attempt at a time)

    def wait(self, key: K, retry: bool) -> None:
        name, capacity = self._server(key)
        if capacity is None:
            return
        call = self._call
        started = time.time()
        try:
            held = self._slots.take(name, call.model, capacity, call.place or ANONYMOUS,
                                    call.client_gone, retry)
        finally:
            if call.trace is not None:  # the wait for a slot, however it ended
                place = call.place or ANONYMOUS
                call.trace.record("slot wait", started, time.time(),
                                  {"server.address": name, "flaskchat.tier": place.tier})
        call.queued = True
        call.queue_seconds += held.waited
        call.held.append(held)
        self._held = held

    def leave(self) -> None:
        """The attempt failed: its slot goes back (the request's others stay)."""
        self.done(None)

    def done(self, used: float | None) -> None:
        """This line's slot goes back (``used``: tokens, where known); the request's
        others stay."""
        held, self._held = self._held, None
        if held is not None:
            if held in self._call.held:
                self._call.held.remove(held)
            held.release(used)

    def down(self, key: K) -> None:
        self._slots.server_failed(self._server(key)[0])

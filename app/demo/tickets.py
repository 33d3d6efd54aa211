"""Single-use, short-lived tickets for the demo page's EventSource streams.

EventSource can only GET and cannot send an Authorization header, so the page POSTs the
conversation with its key and gets a ticket; the stream is then opened with the ticket
alone, and no key ever appears in a URL or a log. A ticket is 192 random bits, valid for
a few seconds, and redeemed once.

Tickets are files in the directory all of this gateway's worker processes share (see
``app.runtime.state_dir``), so that the GET may land on any worker: gunicorn's workers share one
listening socket, and a ticket bound to the worker that issued it would fail whenever the
kernel hands the next connection to another. A rename is the single-use lock: of two
redeemers, exactly one wins. (Several gateway hosts behind a load balancer need sticky
sessions for /demo, or a shared directory: see docs/deploy.md.)

Storage is bounded: at most ``MAX_TICKETS`` wait at once, ``MAX_PER_OWNER`` of them a
key's (a ticket's name starts with a tag of its owner), each body is capped by the route,
and unredeemed ones are swept after their ttl.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

import orjson

from app.errors import Overloaded

MAX_TICKETS = 512  # waiting at once, over every process; with 1 MiB bodies, 512 MiB at most
MAX_PER_OWNER = 16  # waiting at once for one key: a page asks for one at a time
# The owner's tag (8 hex digits), then token_urlsafe(24); claimed/partial files have dots.
_TICKET = re.compile(r"^[0-9a-f]{8}-[A-Za-z0-9_-]{32}$")


@dataclass
class Ticket:
    request: dict[str, Any]  # the chat request as the client sent it (already validated)
    request_id: str
    key_id: str | None  # the database key that asked (None: a --api-keys key, or no key)
    owner: str  # the key's owner id (how a --api-keys key is found again)


class TicketStore:
    def __init__(self, directory: str, ttl: float, clock: Callable[[], float] = time.time,
                 max_waiting: int = MAX_TICKETS, max_per_owner: int = MAX_PER_OWNER) -> None:
        self._dir = directory
        self.ttl = ttl
        self._max = max_waiting
        self._max_per_owner = max_per_owner
        self._clock = clock
        self._next_sweep = 0.0

    def issue(self, request: dict[str, Any], request_id: str, key_id: str | None,
              owner: str) -> str:
        now = self._clock()
        self._sweep(now)
        tag = hashlib.sha256(owner.encode()).hexdigest()[:8]
        waiting = self._waiting()
        retry = {"Retry-After": str(max(int(self.ttl), 1))}
        if len(waiting) >= self._max:
            raise Overloaded("Too many demo streams are waiting to start; retry in a few "
                             "seconds.", headers=retry)
        if sum(name.startswith(tag) for name in waiting) >= self._max_per_owner:
            raise Overloaded("This key has too many demo streams waiting to start; open "
                             "them, or retry in a few seconds.", headers=retry)
        ticket = f"{tag}-{secrets.token_urlsafe(24)}"
        path = os.path.join(self._dir, ticket)
        partial = f"{path}.{os.getpid()}.partial"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(orjson.dumps({"expires": now + self.ttl, "request": request,
                                       "request_id": request_id, "key_id": key_id,
                                       "owner": owner}))
        os.rename(partial, path)  # complete before it can be found
        return ticket

    def redeem(self, ticket: str) -> Ticket | None:
        """The ticket's request, once; None if it never existed, expired or was used."""
        if not _TICKET.match(ticket):
            return None
        path = os.path.join(self._dir, ticket)
        claimed = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.claimed"
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            return None
        try:
            with open(claimed, "rb") as handle:
                data = orjson.loads(handle.read())
        finally:
            os.remove(claimed)
        if data["expires"] < self._clock():
            return None
        return Ticket(data["request"], data["request_id"], data.get("key_id"),
                      data.get("owner") or "")

    def _waiting(self) -> list[str]:
        try:
            return os.listdir(self._dir)
        except FileNotFoundError:
            return []

    def _sweep(self, now: float) -> None:
        """Removes tickets nobody redeemed; at most twice per ttl, when one is issued."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.ttl / 2
        try:
            names = os.listdir(self._dir)
        except FileNotFoundError:
            return
        for name in names:
            path = os.path.join(self._dir, name)
            try:
                if os.stat(path).st_mtime < now - self.ttl:
                    os.remove(path)
            except FileNotFoundError:
                pass

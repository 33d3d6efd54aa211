"""Stored responses (``store: true``, OpenAI's default), in the gateway's database, each
owned by the key that made it: another key gets a 404, as if it did not exist. They
expire after ``--responses-ttl`` (30 days), and at most ``--responses-max`` are kept: past
that the oldest are deleted first (a store that refused new responses when full would
break every client that stores by default). The count is checked every hundredth of the
cap (counting rows costs milliseconds at 100,000), so the store may pass the cap by that
much between two checks.

Saving is off the request's path: a background thread (a greenlet under gevent) writes
what was saved every ``FLUSH`` seconds in one transaction, and a graceful stop writes what
is left. The process that saved a response reads it from memory until it is written; any
other process or host that is asked for a response it does not find looks again for a few
flushes (0.3 s) before its 404. So a client may continue a conversation at once, wherever
its next request lands."""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from datetime import timedelta
from typing import Any

import orjson
from sqlalchemy import Engine, delete, func, insert, select

from app.access.keys import now
from app.access.tables import responses
from app.errors import InvalidRequest, ObjectNotFound

PRUNE_EVERY = 200  # the fewest saves between two prunes (expired rows, then the size cap)
# Seconds between writes of the saved responses: at 0.05 a stored stream cost the gateway
# 50-180 us more than an unstored one (bench/run.py), at 0.1 20-40 us.
FLUSH = 0.1
MAX_PENDING = 10_000  # saved but unwritten responses kept while the database is down
log = logging.getLogger("flaskchat.responses")


def new_response_id() -> str:
    """``resp_`` + the creation time in ms (12 hex digits, so ids sort by age) + 128 random
    bits."""
    return f"resp_{int(time.time() * 1000):012x}{os.urandom(16).hex()}"


_RESPONSE_ID = re.compile(r"resp_[0-9a-f]{44}")


class ResponseNotFound(ObjectNotFound):
    pass


class ResponseStore:
    def __init__(self, engine: Engine, ttl_seconds: float, max_stored: int) -> None:
        self._engine = engine
        self._ttl = timedelta(seconds=ttl_seconds)
        self._max = max_stored
        self._prune_every = max(PRUNE_EVERY, max_stored // 100)
        self._saves = 0
        self._insert = insert(responses)
        self._pending: dict[str, dict[str, Any]] = {}  # saved, not yet written
        self._writing = threading.Lock()
        self._saved = threading.Event()  # set when something waits to be written
        self._writer: threading.Thread | None = None
        self._failing = False

    def save(self, response: dict[str, Any], owner: str, input_items: list[dict[str, Any]],
             context: list[dict[str, Any]]) -> None:
        created = now()
        self._pending[response["id"]] = {
            "id": response["id"], "owner": owner, "model": response["model"],
            "created_at": created, "expires_at": created + self._ttl,
            "input_items": orjson.dumps(input_items).decode(),
            "context": orjson.dumps(context).decode(),
            "response": orjson.dumps(response).decode()}
        if len(self._pending) > MAX_PENDING:
            oldest = next(iter(self._pending))
            del self._pending[oldest]
            log.error("stored responses cannot be written: dropped %s", oldest)
        if not self._saved.is_set():
            self._saved.set()
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, name="responses-writer",
                                                daemon=True)
                self._writer.start()

    def _run(self) -> None:
        """One writer for the process's life (a greenlet under gevent): it sleeps until a
        response is saved, lets a flush's worth gather, and writes them in one go."""
        while True:
            self._saved.wait()
            time.sleep(FLUSH)
            self._saved.clear()  # saves from now on wake the next round
            try:
                self.flush()
            except Exception:  # pruning failed (the database is down): try again later
                log.exception("cannot prune stored responses")
            if self._pending:  # kept because the database is down
                self._saved.set()

    def flush(self) -> None:
        """Writes what was saved (also called on a graceful stop)."""
        with self._writing:
            batch = list(self._pending.values())
            if not batch:
                return
            try:
                with self._engine.begin() as connection:
                    connection.execute(self._insert, batch)
            except Exception as exc:  # the database's failures: keep them, try again
                if not self._failing:
                    log.error("cannot write %d stored responses (kept for later): %s",
                              len(batch), " ".join(str(exc).split())[:300])
                self._failing = True
                return
            self._failing = False
            for row in batch:
                self._pending.pop(row["id"], None)
            self._saves += len(batch)
        if self._saves // self._prune_every != \
                (self._saves - len(batch)) // self._prune_every:
            self.prune()

    def prune(self) -> None:
        with self._engine.begin() as connection:
            connection.execute(delete(responses).where(responses.c.expires_at <= now()))
            count = connection.execute(select(func.count()).select_from(responses)).scalar_one()
            if count > self._max:
                oldest = select(responses.c.id).order_by(responses.c.created_at) \
                    .limit(count - self._max).scalar_subquery()
                connection.execute(delete(responses).where(responses.c.id.in_(oldest)))

    def _row(self, response_id: str, owner: str) -> Any:
        pending = self._pending.get(response_id)
        if pending is not None:
            if pending["owner"] == owner and pending["expires_at"] > now():
                return pending
            raise self._missing(response_id)
        row = self._read(response_id, owner)
        if row is None and _RESPONSE_ID.fullmatch(response_id):
            # Saved by another process a moment ago? Its write is due within a few flushes.
            # (Not judged by the id's time: that is when the response started, and a long
            # generation is saved minutes later.)
            due = time.monotonic() + 3 * FLUSH
            while row is None and time.monotonic() < due:
                time.sleep(FLUSH / 2)
                row = self._read(response_id, owner)
        if row is None:
            raise self._missing(response_id)
        return row

    def _missing(self, response_id: str) -> ResponseNotFound:
        return ResponseNotFound(f"Response with id '{response_id}' not found.", "response_id")

    def _read(self, response_id: str, owner: str) -> Any:
        with self._engine.connect() as connection:
            return connection.execute(select(responses).where(
                responses.c.id == response_id, responses.c.owner == owner,
                responses.c.expires_at > now())).mappings().first()

    def get(self, response_id: str, owner: str) -> dict[str, Any]:
        stored: dict[str, Any] = json.loads(self._row(response_id, owner)["response"])
        return stored

    def context(self, response_id: str, owner: str) -> list[dict[str, Any]]:
        """The chat messages a follow-up of this response replays, its output included."""
        try:
            row = self._row(response_id, owner)
        except ResponseNotFound:
            raise ResponseNotFound(f"Previous response with id '{response_id}' not found.",
                                   "previous_response_id") from None
        replay: list[dict[str, Any]] = json.loads(row["context"])
        return replay

    def delete(self, response_id: str, owner: str) -> dict[str, Any]:
        self._row(response_id, owner)
        self._pending.pop(response_id, None)
        with self._engine.begin() as connection:
            connection.execute(delete(responses).where(responses.c.id == response_id,
                                                       responses.c.owner == owner))
        return {"id": response_id, "object": "response", "deleted": True}

    def input_items(self, response_id: str, owner: str, after: str | None, limit: int,
                    order: str) -> dict[str, Any]:
        """A page, as OpenAI's lists: ``data``, ``first_id``, ``last_id``, ``has_more``."""
        items: list[dict[str, Any]] = json.loads(self._row(response_id, owner)["input_items"])
        if order == "desc":
            items.reverse()
        if after is not None:
            positions = [index for index, item in enumerate(items) if item.get("id") == after]
            if not positions:
                raise InvalidRequest(f"Invalid 'after': no input item {after!r} in this "
                                     "response.", "after")
            items = items[positions[0] + 1:]
        page = items[:limit]
        return {"object": "list", "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(items) > limit}

"""Stored responses (``store: true``, OpenAI's default), in the gateway's database, each
owned by the key that made it (``Principal.owner``: a --api-keys key owns its own too):
another key gets a 404, as if it did not exist. They expire after ``--responses-ttl`` (30
days), and at most ``--responses-max`` are kept: past that the oldest are deleted first (a
store that refused new responses when full would break every client that stores by
default). The count is checked every hundredth of the cap (counting rows costs
milliseconds at 100,000), so the store may pass the cap by that much between two checks.

Bounded in bytes too: a response larger than ``--responses-max-bytes`` (its input items,
the turns it replays and the response) is not stored (``save`` says so, and the response
object's ``store`` is false), each owner keeps at most ``--responses-key-quota`` bytes
and at most ``--responses-key-max`` responses (``app.responses.quota``), and what waits to
be written is bounded in count and bytes.

Saving is off the request's path: a background thread (a greenlet under gevent) writes
what was saved every ``FLUSH`` seconds in one transaction, and a graceful stop writes what
is left, retrying for a while if the database refuses. A batch the database refuses
while it answers holds a row it rejects: each is then written alone and only the rejected
ones are dropped. The process that saved a response reads it from memory until it is
written; any other process or host that is asked for a response it does not find looks
again for a few flushes (0.3 s) before its 404. So a client may continue a conversation at
once, wherever its next request lands."""
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

from app.access.database import answers, reason, write_before_stopping
from app.access.keys import now
from app.access.tables import responses
from app.errors import InvalidRequest, ObjectNotFound
from app.responses.quota import OwnerQuota

PRUNE_EVERY = 200  # the fewest saves between two prunes (expired rows, then the size cap)
# Seconds between writes of the saved responses: at 0.05 a stored stream cost the gateway
# 50-180 us more than an unstored one (bench/run.py), at 0.1 20-40 us.
FLUSH = 0.1
MAX_PENDING = 10_000  # saved but unwritten responses kept while the database is down
MAX_PENDING_BYTES = 64 * 1024 * 1024  # and their bytes
log = logging.getLogger("flaskchat.responses")


def new_response_id() -> str:
    """``resp_`` + the creation time in ms (12 hex digits, so ids sort by age) + 128 random
    bits."""
    return f"resp_{int(time.time() * 1000):012x}{os.urandom(16).hex()}"


_RESPONSE_ID = re.compile(r"resp_[0-9a-f]{44}")


class ResponseNotFound(ObjectNotFound):
    pass


class ResponseStore:
    def __init__(self, engine: Engine, ttl_seconds: float, max_stored: int,
                 max_bytes: int = 1024 * 1024, owner_quota: int = 256 * 1024 * 1024,
                 owner_max: int = 10_000) -> None:
        self._engine = engine
        self._ttl = timedelta(seconds=ttl_seconds)
        self._max = max_stored
        self.max_bytes = max_bytes
        self._quota = OwnerQuota(owner_quota, owner_max)
        self._pending_bytes = 0
        self._prune_every = max(PRUNE_EVERY, max_stored // 100)
        self._saves = 0
        self._insert = insert(responses)
        self._pending: dict[str, dict[str, Any]] = {}  # saved, not yet written
        self._writing = threading.Lock()
        self._saved = threading.Event()  # set when something waits to be written
        self._writer: threading.Thread | None = None
        self._failing = False

    def save(self, response: dict[str, Any], owner: str, input_items: list[dict[str, Any]],
             context: list[dict[str, Any]]) -> bool:
        """Stores the response, unless it is larger than ``max_bytes``: False then (its
        ``store`` is set to false, which the client sees in the response object)."""
        items = orjson.dumps(input_items).decode()
        replay = orjson.dumps(context).decode()
        saved = orjson.dumps(response).decode()
        size = len(items) + len(replay) + len(saved)
        if size > self.max_bytes:
            response["store"] = False
            log.info("response %s not stored: %d bytes, more than --responses-max-bytes "
                     "(%d)", response["id"], size, self.max_bytes)
            return False
        created = now()
        self._pending[response["id"]] = {
            "id": response["id"], "owner": owner, "model": response["model"],
            "created_at": created, "expires_at": created + self._ttl,
            "input_items": items, "context": replay, "response": saved, "bytes": size}
        self._pending_bytes += size
        while len(self._pending) > MAX_PENDING or self._pending_bytes > MAX_PENDING_BYTES:
            oldest = next(iter(self._pending))
            self._pending_bytes -= self._pending.pop(oldest)["bytes"]
            log.error("stored responses cannot be written: dropped %s", oldest)
        if not self._saved.is_set():
            self._saved.set()
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, name="responses-writer",
                                                daemon=True)
                self._writer.start()
        return True

    def fits(self, input_bytes: int) -> bool:
        """Whether a response whose input alone is ``input_bytes`` could be stored."""
        return input_bytes <= self.max_bytes

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

    def stop(self) -> bool:
        """On a graceful stop: what is left is written, retried for a while if the
        database refuses (as the usage ledger does)."""
        return write_before_stopping(self.flush, lambda: len(self._pending),
                                     "stored responses")

    def flush(self) -> bool:
        """Writes what was saved; False if the database cannot be written (it is kept)."""
        with self._writing:
            batch = list(self._pending.values())
            if not batch:
                return True
            try:
                self._write(batch)
            except Exception as exc:  # the database's failures, or a row it rejects
                if not answers(self._engine):
                    if not self._failing:
                        log.error("cannot write %d stored responses (kept for later): %s",
                                  len(batch), reason(exc))
                    self._failing = True
                    return False
                for row in batch:  # it answers: a row it rejects; each goes alone
                    try:
                        self._write([row])
                    except Exception as alone:  # that row's fault, or the database's
                        if not answers(self._engine):
                            return False  # the rest waits for the next try
                        log.error("the database rejected stored response %s (not stored): "
                                  "%s", row["id"], reason(alone))
                    self._forget(row)
            self._failing = False
            for row in batch:
                self._forget(row)
            self._saves += len(batch)
        if self._saves // self._prune_every != \
                (self._saves - len(batch)) // self._prune_every:
            self.prune()
        return True

    def _write(self, rows: list[dict[str, Any]]) -> None:
        with self._engine.begin() as connection:
            connection.execute(self._insert, rows)
            self._quota.written(connection, ((row["owner"], row["bytes"]) for row in rows))

    def _forget(self, row: dict[str, Any]) -> None:
        if self._pending.pop(row["id"], None) is not None:
            self._pending_bytes -= row["bytes"]

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

    def context(self, response_id: str, owner: str) -> tuple[list[dict[str, Any]], int]:
        """The chat messages a follow-up of this response replays, its output included,
        and their size in bytes (as stored)."""
        try:
            row = self._row(response_id, owner)
        except ResponseNotFound:
            raise ResponseNotFound(f"Previous response with id '{response_id}' not found.",
                                   "previous_response_id") from None
        replay: list[dict[str, Any]] = json.loads(row["context"])
        return replay, len(row["context"])

    def delete(self, response_id: str, owner: str) -> dict[str, Any]:
        row = self._row(response_id, owner)
        if response_id in self._pending:
            self._forget(row)
        self._quota.forget(owner)
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

"""Stored responses (``store: true``, OpenAI's default), in the gateway's database, each
owned by the key that made it: another key gets a 404, as if it did not exist. They
expire after ``--responses-ttl`` (30 days), and at most ``--responses-max`` are kept: past
that the oldest are deleted first (a store that refused new responses when full would
break every client that stores by default)."""
from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import orjson
from sqlalchemy import Engine, delete, func, insert, select

from app.access.keys import now
from app.access.tables import responses
from app.errors import InvalidRequest, ObjectNotFound

PRUNE_EVERY = 200  # saves between two prunes (expired rows, then the size cap)


class ResponseNotFound(ObjectNotFound):
    pass


class ResponseStore:
    def __init__(self, engine: Engine, ttl_seconds: float, max_stored: int) -> None:
        self._engine = engine
        self._ttl = timedelta(seconds=ttl_seconds)
        self._max = max_stored
        self._saves = 0
        self._insert = insert(responses)

    def save(self, response: dict[str, Any], owner: str, input_items: list[dict[str, Any]],
             context: list[dict[str, Any]]) -> None:
        created = now()
        row = {"id": response["id"], "owner": owner, "model": response["model"],
               "created_at": created, "expires_at": created + self._ttl,
               "input_items": orjson.dumps(input_items).decode(),
               "context": orjson.dumps(context).decode(),
               "response": orjson.dumps(response).decode()}
        with self._engine.begin() as connection:
            connection.execute(self._insert, row)  # built once: SQLAlchemy caches its SQL
        self._saves += 1
        if self._saves % PRUNE_EVERY == 1:
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
        with self._engine.connect() as connection:
            row = connection.execute(select(responses).where(
                responses.c.id == response_id, responses.c.owner == owner,
                responses.c.expires_at > now())).mappings().first()
        if row is None:
            raise ResponseNotFound(f"Response with id '{response_id}' not found.",
                                   "response_id")
        return row

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

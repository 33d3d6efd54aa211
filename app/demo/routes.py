"""The browser demo: GET /demo (the page), POST /demo/streams (a ticket for one reply,
with the API key), GET /demo/stream/<ticket> (the reply as SSE, for EventSource).

The page and its files need no key: they hold nothing. The ticket is the credential for
the stream (see ``app.demo.tickets``). Failures after the ticket is redeemed are sent as
an error event in a 200 stream, because EventSource cannot read an error body.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import orjson
from flask import Blueprint, current_app
from flask.typing import ResponseReturnValue

from app.demo.tickets import Ticket, TicketStore
from app.errors import APIError, AuthenticationFailed, TicketNotFound
from app.routes.relayed import serves
from app.serving import chat, relay
from app.serving.call import Call
from app.serving.events import DONE, error_event
from app.web import sse
from app.web.admission import admit
from app.web.access import access, admit_key, authenticate
from app.web.context import call, schemas, upstream
from app.web.handlers import report
from app.web.json_io import json_response, read_json_object
from app.web.pages import serve_page
from app.web.validation import load

EXTENSION = "flaskchat.demo_tickets"

bp = Blueprint("demo", __name__)
serve_page(bp, "demo", Path(__file__).resolve().parent / "static")


def tickets() -> TicketStore:
    found: TicketStore = current_app.extensions[EXTENSION]
    return found


@bp.post("/demo/streams")
def create_stream() -> ResponseReturnValue:
    """Everything that can be refused is refused here, where the page can read why."""
    principal = authenticate()
    payload = read_json_object()
    payload.pop("stream", None)
    payload.pop("stream_options", None)
    body = load(schemas().chat, payload)
    call().use_model(body["model"])
    if not serves(body["model"]):
        upstream().controller.require_model(body["model"])
    store = tickets()
    ticket = store.issue(payload, call().request_id,
                         principal.key_id if principal is not None else None)
    return json_response({"id": ticket, "url": f"demo/stream/{ticket}",
                          "expires_in": store.ttl}, 201)


@bp.get("/demo/stream/<ticket>")
def stream(ticket: str) -> ResponseReturnValue:
    found = tickets().redeem(ticket)
    if found is None:
        raise TicketNotFound("This demo stream does not exist, has expired or was already "
                             "used; send the message again.")
    try:
        principal = access().gate.directory.principal(found.key_id)
        if principal is None:
            raise AuthenticationFailed("The API key that asked for this reply has been "
                                       "revoked or has expired.")
        call().allowed_models = principal.models
        admit_key(principal, len(orjson.dumps(found.request)))
        admit()
        events, on_close = _open_stream(found, call())
    except APIError as exc:  # EventSource cannot read an error body: an error event
        if exc.status >= 500:
            report(exc)
        return sse.response([error_event(exc) + DONE])
    return sse.response(events, on_close)


def _open_stream(found: Ticket, current: Call
                 ) -> tuple[Iterator[bytes | None], list[Callable[[], object]]]:
    current.request_id = found.request_id  # one id for the POST and its stream
    request: dict[str, Any] = {**found.request, "stream": True,
                               "stream_options": {"include_usage": True}}
    body = load(schemas().chat, request)
    if serves(body["model"]):
        return relay.open_stream(relay.CHAT, request, body["model"], upstream(), current)
    return chat.open_stream(body, upstream(), current)

"""The browser demo: GET /demo (the page), POST /demo/streams (a ticket for one reply,
with the API key), GET /demo/stream/<ticket> (the reply as SSE, for EventSource).

The page and its files need no key: they hold nothing. The ticket is the credential for
the stream (see ``app.demo.tickets``). Making one counts as a request of its key (rpm and
this process's admission) and is refused as its stream would be; its body is capped
(``MAX_TICKET_BODY``). Its stream then reserves and is charged as any model request.
Failures after the ticket is redeemed are sent as an error event in a 200 stream,
because EventSource cannot read an error body.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import orjson
from flask import Blueprint, current_app, request
from flask.typing import ResponseReturnValue

from app.demo.tickets import Ticket, TicketStore
from app.errors import APIError, AuthenticationFailed, PayloadTooLarge, TicketNotFound
from app.routes.relayed import serves
from app.serving import chat, relay
from app.serving.call import Call
from app.serving.events import DONE, error_event
from app.web import sse
from app.web.admission import admit
from app.web.access import access, admit_ticket, authenticate, charge_to, identify
from app.web.context import call, schemas, upstream
from app.web.handlers import for_caller, report
from app.web.json_io import json_response, read_json_object
from app.web.pages import serve_page
from app.web.validation import load
from schemas.sampling import generations

EXTENSION = "flaskchat.demo_tickets"
MAX_TICKET_BODY = 1024 * 1024  # the page sends a conversation: this is plenty

bp = Blueprint("demo", __name__)
serve_page(bp, "demo", Path(__file__).resolve().parent / "static")


def tickets() -> TicketStore:
    found: TicketStore = current_app.extensions[EXTENSION]
    return found


@bp.post("/demo/streams")
def create_stream() -> ResponseReturnValue:
    """Everything that can be refused is refused here, where the page can read why."""
    principal = authenticate()
    if (request.content_length or 0) > MAX_TICKET_BODY or \
            len(request.get_data(cache=True)) > MAX_TICKET_BODY:
        raise PayloadTooLarge(f"A demo conversation is limited to {MAX_TICKET_BODY} bytes; "
                              "start a new one.")
    payload = read_json_object()
    payload.pop("stream", None)
    payload.pop("stream_options", None)
    body = load(schemas().chat, payload)
    call().use_model(body["model"])
    if not serves(body["model"]):
        upstream().controller.require_model(body["model"])
    if principal is None:  # a preflight has no body; never here, but never let in
        raise AuthenticationFailed("No API key.")
    admit()
    admit_ticket(principal, len(request.get_data(cache=True)))
    store = tickets()
    ticket = store.issue(payload, call().request_id, principal.key_id, principal.owner)
    return json_response({"id": ticket, "url": f"demo/stream/{ticket}",
                          "expires_in": store.ttl}, 201)


@bp.get("/demo/stream/<ticket>")
def stream(ticket: str) -> ResponseReturnValue:
    found = tickets().redeem(ticket)
    if found is None:
        raise TicketNotFound("This demo stream does not exist, has expired or was already "
                             "used; send the message again.")
    try:
        principal = access().gate.directory.principal(found.key_id, found.owner)
        if principal is None:
            raise AuthenticationFailed("The API key that asked for this reply has been "
                                       "revoked or has expired.")
        current = call()
        identify(current, principal)
        current.prompt_bytes = len(orjson.dumps(found.request))
        charge_to(principal, counts_request=False)  # the ticket was the request
        admit()
        events, on_close = _open_stream(found, current)
    except APIError as exc:  # EventSource cannot read an error body: an error event
        if exc.status >= 500:
            report(exc)
        return sse.response([error_event(for_caller(exc)) + DONE])
    return sse.response(events, on_close)


def _open_stream(found: Ticket, current: Call
                 ) -> tuple[Iterator[bytes | None], list[Callable[[], object]]]:
    current.request_id = found.request_id  # one id for the POST and its stream
    asked: dict[str, Any] = {**found.request, "stream": True,
                             "stream_options": {"include_usage": True}}
    body = load(schemas().chat, asked)
    if serves(body["model"]):
        return relay.open_stream(relay.CHAT, asked, body["model"], upstream(), current,
                                 body["max_tokens"], generations(body["n"], body["best_of"]))
    return chat.open_stream(body, upstream(), current)

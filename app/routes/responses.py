"""POST /v1/responses (the Responses API, on the chat path), GET and DELETE
/v1/responses/{id}, GET /v1/responses/{id}/input_items."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import orjson
from flask import Blueprint, current_app, request
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import SQLAlchemyError

from app.errors import APIError, InvalidRequest, UpstreamUnavailable
from app.responses import output, translate
from app.responses.store import ResponseStore, new_response_id
from app.responses.stream import EventChunks, ResponseEvents
from app.responses.stream import translate as translate_stream
from app.routes.relayed import serves
from app.serving import chat, relay
from app.web import sse
from app.web.access import count_request, require_api_key
from app.web.admission import admit
from app.web.context import call, schemas, upstream
from app.web.handlers import error_response
from app.web.json_io import json_response, read_json_object
from app.web.validation import load
from schemas import ResponsesRequest

STORE = "flaskchat.responses_store"

bp = Blueprint("responses", __name__)
bp.before_request(require_api_key)
bp.before_request(admit)


def response_store() -> ResponseStore:
    found: ResponseStore = current_app.extensions[STORE]
    return found


@bp.errorhandler(SQLAlchemyError)
def database_unavailable(error: SQLAlchemyError) -> ResponseReturnValue:
    return error_response(UpstreamUnavailable(
        "The database of stored responses cannot be reached; retry shortly, or send "
        "'store': false without 'previous_response_id'.", headers={"Retry-After": "2"}))


def _owner() -> str:
    return call().owner


@bp.post("/v1/responses")
def create_response() -> ResponseReturnValue:
    body = load(schemas().responses, read_json_object())
    translate.refuse_unsupported(body)
    store = response_store()
    owner = _owner()
    history, history_bytes = store.context(body["previous_response_id"], owner) \
        if body["previous_response_id"] else ([], 0)
    call().extra_prompt_bytes = history_bytes  # the key pays for the turns replayed
    payload, items, messages = translate.chat_request(body, history,
                                                      schemas().max_messages)
    keep = body["store"] is not False and \
        _fits(store, body, items, messages[len(history):], history_bytes)

    def done(response: dict[str, Any]) -> None:
        if keep:
            store.save(response, owner, items, messages + output.context_of(response["output"]))
        else:
            response["store"] = False

    response_id = new_response_id()
    try:
        return _answer(body, payload, response_id, done)
    except APIError as exc:  # from the chat path: named as the client named the field
        raise translate.with_responses_param(exc) from None


def _fits(store: ResponseStore, body: ResponsesRequest, items: list[dict[str, Any]],
          new_messages: list[dict[str, Any]], history_bytes: int) -> bool:
    """Whether the request's input (its items, and the messages a follow-up would replay:
    the earlier turns and these) leaves room to store its response: if not, a request
    that asked for ``store: true`` is refused before any model work; one that stores by
    default is answered, not stored (its ``store`` is false)."""
    if store.fits(len(orjson.dumps(items)) + history_bytes
                  + len(orjson.dumps(new_messages))):
        return True
    if body["store"]:
        raise InvalidRequest(f"This response cannot be stored: its input is larger than the "
                             f"server's limit of {store.max_bytes} bytes for a stored "
                             "response. Send 'store': false (and no previous_response_id "
                             "next time), or a shorter input.", "store")
    return False


def _answer(body: ResponsesRequest, payload: dict[str, Any], response_id: str,
            done: Callable[[dict[str, Any]], None]) -> ResponseReturnValue:
    model = body["model"]
    if serves(model):  # an OpenAI-compatible upstream: relayed as chat
        if body["stream"]:
            events, on_close = relay.open_stream(relay.CHAT, payload, model, upstream(),
                                                 call(), body["max_output_tokens"])
            translated = ResponseEvents(body, response_id, done)
            translated.response["service_tier"] = call().service_tier
            return _stream(translate_stream(events, translated), on_close, translated)
        completion = relay.complete(relay.CHAT, payload, model, upstream(), call(),
                                    body["max_output_tokens"])
    else:
        chat_body = translate.chat_body(payload)
        if body["stream"]:
            translated = ResponseEvents(body, response_id, done)
            events, on_close = chat.open_stream(chat_body, upstream(), call(),
                                                EventChunks(translated))
            translated.response["service_tier"] = call().service_tier
            return _stream(events, on_close, translated)
        completion = chat.complete(chat_body, upstream(), call())
    response = output.from_chat(body, response_id, completion)
    response["service_tier"] = call().service_tier
    done(response)
    return json_response(response)


def _stream(events: Iterator[bytes | None], on_close: list[Callable[[], object]],
            translated: ResponseEvents) -> ResponseReturnValue:
    """A failure after the first byte ends the stream with response.failed."""
    return sse.response(events, on_close, lambda error:
                        translated.fail({"code": error.code, "message": error.message}))


@bp.get("/v1/responses/<response_id>")
def retrieve_response(response_id: str) -> ResponseReturnValue:
    count_request()
    if request.args.get("stream") in ("true", "1"):
        raise InvalidRequest("Streaming a stored response again is not supported: "
                             "retrieve it without 'stream'.", "stream")
    return json_response(response_store().get(response_id, _owner()))


@bp.delete("/v1/responses/<response_id>")
def delete_response(response_id: str) -> ResponseReturnValue:
    count_request()
    return json_response(response_store().delete(response_id, _owner()))


@bp.get("/v1/responses/<response_id>/input_items")
def list_input_items(response_id: str) -> ResponseReturnValue:
    count_request()
    limit_text = request.args.get("limit", "20")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 100:
        raise InvalidRequest("Invalid 'limit': must be a whole number from 1 to 100.",
                             "limit")
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("Invalid 'order': must be asc or desc.", "order")
    return json_response(response_store().input_items(
        response_id, _owner(), request.args.get("after"), int(limit_text), order))

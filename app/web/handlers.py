"""Every exception a request can end in, rendered as the OpenAI error envelope with its
HTTP status: ours (APIError), werkzeug's (404, 405, 413, a bad body...) and anything
unexpected (a 500 with nothing internal in it, and a logged traceback)."""
from __future__ import annotations

import logging
from typing import Callable

from flask import Flask, Response, current_app, g
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from app.errors import (APIError, InvalidRequest, MethodNotAllowed, ModelNotFound,
                        PayloadTooLarge, RouteNotFound, UnsupportedMediaType, envelope)
from app.web.json_io import json_response

log = logging.getLogger("flaskchat")

ServerErrorHook = Callable[[APIError], None]
# app.extensions: told of each error answered with a 5xx and of each that ended a stream
HOOK = "flaskchat.on_server_error"

_HTTP_ERRORS: dict[int, type[APIError]] = {
    400: InvalidRequest, 404: RouteNotFound, 405: MethodNotAllowed, 413: PayloadTooLarge,
    415: UnsupportedMediaType,
}


def failure_hook() -> ServerErrorHook:
    """The app's hook, for a stream to call after the request context is gone."""
    hook: ServerErrorHook = current_app.extensions.get(HOOK, _ignore)
    return hook


def report(error: APIError) -> None:
    """Tells the app's hook of a failure answered other than by raising (an error event)."""
    failure_hook()(error)


def _ignore(error: APIError) -> None:
    pass


def for_caller(error: APIError) -> APIError:
    """``error`` as the request's caller may see it: a 404 lists only the models its key
    may use."""
    if isinstance(error, ModelNotFound):
        current = g.get("call")
        return error.for_caller(current.allowed_models if current is not None else None)
    return error


def error_response(error: APIError) -> Response:
    error = for_caller(error)
    response = json_response(envelope(error), error.status)
    response.headers.update(error.headers)
    return response


def init_app(app: Flask, on_server_error: ServerErrorHook | None = None) -> None:
    """``on_server_error`` hears of every 5xx answered (the gateway counts them)."""
    hook: ServerErrorHook = on_server_error or _ignore
    app.extensions[HOOK] = hook

    @app.errorhandler(APIError)
    def handle_api_error(error: APIError) -> Response:
        if error.status >= 500:
            log.warning("%s %s: %s%s", error.status, error.code, error.message,
                        f" ({error.internal})" if error.internal else "")
            hook(error)
        return error_response(error)

    @app.errorhandler(RequestEntityTooLarge)
    def handle_too_large(error: RequestEntityTooLarge) -> Response:
        limit = app.config.get("MAX_CONTENT_LENGTH")
        return error_response(PayloadTooLarge(
            f"Request body is larger than the limit of {limit} bytes."))

    @app.errorhandler(HTTPException)
    def handle_http_error(error: HTTPException) -> Response:
        status = error.code or 500
        cls = _HTTP_ERRORS.get(status, InvalidRequest if status < 500 else APIError)
        wrapped = cls(error.description or error.name)
        wrapped.status = status
        response = error_response(wrapped)
        allowed = error.get_response().headers.get("Allow") if status == 405 else None
        if allowed:
            response.headers["Allow"] = allowed
        return response

    @app.errorhandler(Exception)
    def handle_unexpected(error: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(APIError("The server had an error while processing your "
                                       "request. Retry, or report it with the request id."))

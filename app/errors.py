"""The exception tree, its HTTP statuses, the one envelope builder and the Flask handlers.

Every error a client can see is built by :func:`envelope`: the OpenAI shape
``{"error": {"message", "type", "param", "code"}}`` plus FastChat's top-level
``object``/``message``/``code`` so that FastChat-era clients keep working.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask, Response

log = logging.getLogger("flaskchat")

# FastChat's ErrorCode values (fastchat/constants.py), carried at the top level of the body.
VALIDATION_TYPE_ERROR = 40001
INVALID_AUTH_KEY = 40101
INVALID_MODEL = 40301
PARAM_OUT_OF_RANGE = 40302
CONTEXT_OVERFLOW = 40303
RATE_LIMIT = 42901
ENGINE_OVERLOADED = 42903
INTERNAL_ERROR = 50001
CUDA_OUT_OF_MEMORY = 50002
CONTROLLER_NO_WORKER = 50005
CONTROLLER_WORKER_TIMEOUT = 50006


class APIError(Exception):
    """Root of every error that reaches a client. Subclasses set the class attributes."""

    status = 500
    type = "server_error"
    code: str | None = None
    fastchat_code = INTERNAL_ERROR
    # Raised before a worker sent any answer, and not about the request itself: the
    # request may be sent to another worker of the model instead.
    failover = False
    counted = False  # already in the upstream-errors metric (each failure counts once)

    def __init__(self, message: str, param: str | None = None, *,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message or self.__class__.__name__
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}


class InvalidRequest(APIError):
    status, type, fastchat_code = 400, "invalid_request_error", VALIDATION_TYPE_ERROR


class ParamOutOfRange(InvalidRequest):
    fastchat_code = PARAM_OUT_OF_RANGE


class ContextLengthExceeded(InvalidRequest):
    code, fastchat_code = "context_length_exceeded", CONTEXT_OVERFLOW


class AuthenticationFailed(APIError):
    status, type, code, fastchat_code = 401, "invalid_request_error", "invalid_api_key", \
        INVALID_AUTH_KEY


class ModelNotFound(InvalidRequest):
    status, code, fastchat_code = 404, "model_not_found", INVALID_MODEL


class RouteNotFound(InvalidRequest):
    status, code = 404, "not_found"


class MethodNotAllowed(InvalidRequest):
    status, code = 405, "method_not_allowed"


class TicketNotFound(InvalidRequest):
    status, code = 404, "stream_not_found"


class PayloadTooLarge(InvalidRequest):
    status, code = 413, "request_too_large"


class UnsupportedMediaType(InvalidRequest):
    status, code = 415, "unsupported_media_type"


class ClientClosedRequest(InvalidRequest):
    """The client left before the answer was ready (nginx's 499); nobody reads this."""

    status, code = 499, "client_closed_request"


class Overloaded(APIError):
    status, type, code, fastchat_code = 429, "rate_limit_error", "overloaded", RATE_LIMIT


class UpstreamError(APIError):
    """A worker or the controller answered with something we cannot use."""

    status, code = 502, "bad_gateway"


class UpstreamUnavailable(APIError):
    """No worker for the model, or none reachable; retrying later may work."""

    status, code, fastchat_code = 503, "service_unavailable", CONTROLLER_NO_WORKER


class WorkerUnreachable(UpstreamUnavailable):
    """The connection itself failed: nothing was sent, so another worker may be tried."""

    failover = True


class WorkerOutOfMemory(UpstreamUnavailable):
    code, fastchat_code = "worker_out_of_memory", CUDA_OUT_OF_MEMORY


class UpstreamTimeout(APIError):
    status, code, fastchat_code = 504, "upstream_timeout", CONTROLLER_WORKER_TIMEOUT
    failover = True


class ConnectTimedOut(UpstreamTimeout):
    """Not even the connection could be made in time: the host is down or cut off."""


def envelope(error: APIError) -> dict[str, Any]:
    return {
        "error": {"message": error.message, "type": error.type, "param": error.param,
                  "code": error.code},
        "object": "error",
        "message": error.message,
        "code": error.fastchat_code,
    }


def error_response(error: APIError) -> "Response":
    from app.web.json_io import json_response

    response = json_response(envelope(error), error.status)
    response.headers.update(error.headers)
    return response


_HTTP_ERRORS: dict[int, type[APIError]] = {
    400: InvalidRequest, 404: RouteNotFound, 405: MethodNotAllowed, 413: PayloadTooLarge,
    415: UnsupportedMediaType,
}


def init_app(app: "Flask") -> None:
    from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

    @app.errorhandler(APIError)
    def handle_api_error(error: APIError) -> "Response":
        if error.status >= 500:
            log.warning("%s %s: %s", error.status, error.code, error.message)
            from app.telemetry import metrics
            metrics.count_upstream_error(error)
        return error_response(error)

    @app.errorhandler(RequestEntityTooLarge)
    def handle_too_large(error: RequestEntityTooLarge) -> "Response":
        limit = app.config.get("MAX_CONTENT_LENGTH")
        return error_response(PayloadTooLarge(
            f"Request body is larger than the limit of {limit} bytes."))

    @app.errorhandler(HTTPException)
    def handle_http_error(error: HTTPException) -> "Response":
        status = error.code or 500
        cls = _HTTP_ERRORS.get(status, InvalidRequest if status < 500 else APIError)
        wrapped = cls(error.description or error.name)
        wrapped.status = status
        response = error_response(wrapped)
        if status == 405 and error.get_response().headers.get("Allow"):
            response.headers["Allow"] = error.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    def handle_unexpected(error: Exception) -> "Response":
        log.exception("unhandled error")
        return error_response(APIError("The server had an error while processing your "
                                       "request. Retry, or report it with the request id."))

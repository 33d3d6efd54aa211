"""The exception tree (each class carries its HTTP status and codes) and the envelope.

Every error a client can see is built by :func:`envelope`: the OpenAI shape
``{"error": {"message", "type", "param", "code"}}`` plus FastChat's top-level
``object``/``message``/``code`` so that FastChat-era clients keep working. Rendering an
error as a Flask response is ``app.web.handlers``' job.
"""
from __future__ import annotations

import copy
from typing import Any

from app.protocol.error_codes import (CONTEXT_OVERFLOW, CONTROLLER_NO_WORKER,
                                      CONTROLLER_WORKER_TIMEOUT, CUDA_OUT_OF_MEMORY,
                                      INTERNAL_ERROR, INVALID_AUTH_KEY, INVALID_MODEL,
                                      PARAM_OUT_OF_RANGE, RATE_LIMIT, VALIDATION_TYPE_ERROR)


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
    # What only the logs may say: which server failed (an upstream's address). A message
    # a client sees never names one.
    internal: str | None = None

    def __init__(self, message: str, param: str | None = None, *,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message or self.__class__.__name__
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def __copy__(self) -> "APIError":
        """The same error as a new object, not yet counted: a cached failure raised again
        for another request is that request's failure too."""
        clone = self.__class__.__new__(self.__class__)
        clone.args = self.args
        clone.__dict__.update(self.__dict__)
        clone.headers = dict(self.headers)
        clone.counted = False
        return clone


class InvalidRequest(APIError):
    status, type, fastchat_code = 400, "invalid_request_error", VALIDATION_TYPE_ERROR


class ParamOutOfRange(InvalidRequest):
    fastchat_code = PARAM_OUT_OF_RANGE


class ContextLengthExceeded(InvalidRequest):
    code, fastchat_code = "context_length_exceeded", CONTEXT_OVERFLOW


class AuthenticationFailed(APIError):
    status, type, code, fastchat_code = 401, "invalid_request_error", "invalid_api_key", \
        INVALID_AUTH_KEY


class PermissionDenied(InvalidRequest):
    """A valid key that may not do this (an ordinary key on the admin API)."""

    status, code = 403, "insufficient_permissions"


class ModelNotFound(InvalidRequest):
    status, code, fastchat_code = 404, "model_not_found", INVALID_MODEL

    def __init__(self, message: str, param: str | None = None, *,
                 available: tuple[str, ...] = ()) -> None:
        """``available``: the models that do exist, of which a caller is told those it may
        use (``for_caller``), never the others."""
        super().__init__(message, param)
        self.available = available

    def for_caller(self, may_use: frozenset[str] | None) -> "ModelNotFound":
        """This error as the caller may see it: the message lists only the models the
        caller's key may use (``may_use``; None: every model)."""
        if not self.available:
            return self
        shown = [m for m in self.available if may_use is None or m in may_use]
        found = copy.copy(self)
        found.message = f"{self.message} Available models: {', '.join(shown) or 'none'}."
        found.available = ()
        return found


class RouteNotFound(InvalidRequest):
    status, code = 404, "not_found"


class MethodNotAllowed(InvalidRequest):
    status, code = 405, "method_not_allowed"


class ObjectNotFound(InvalidRequest):
    """An API key, a stored response... that does not exist (or is not the caller's)."""

    status, code = 404, "not_found"


class Conflict(InvalidRequest):
    status, code = 409, "conflict"


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


class RateLimitExceeded(APIError):
    """A key's requests, tokens or parallel requests per its limits; ``kind`` is OpenAI's
    error type for it: "requests" or "tokens"."""

    status, code, fastchat_code = 429, "rate_limit_exceeded", RATE_LIMIT

    def __init__(self, message: str, kind: str, *, headers: dict[str, str]) -> None:
        super().__init__(message, headers=headers)
        self.type = kind


class QuotaExceeded(APIError):
    """A key's token budget for its day or month is spent; retrying will not help (the
    ``x-should-retry: false`` header tells the official clients so)."""

    status, type, code, fastchat_code = 429, "insufficient_quota", "insufficient_quota", \
        RATE_LIMIT


class UpstreamError(APIError):
    """A worker or the controller answered with something we cannot use."""

    status, code = 502, "bad_gateway"


class UpstreamUnavailable(APIError):
    """No worker for the model, or none reachable; retrying later may work."""

    status, code, fastchat_code = 503, "service_unavailable", CONTROLLER_NO_WORKER


class WorkerUnreachable(UpstreamUnavailable):
    """The connection itself failed: nothing was sent, so another worker may be tried."""

    failover = True


class ServerStopping(UpstreamUnavailable):
    """The process is stopping and its graceful timeout ran out for this request."""

    code = "server_stopping"


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

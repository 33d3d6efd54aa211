"""CORS: closed unless --allowed-origins is set; then answers preflights and tags responses.

With credentials allowed, a wildcard origin is answered with the caller's own origin, since
browsers refuse ``*`` together with credentials.
"""
from __future__ import annotations

from flask import Flask, Response, request

from app.config import Settings

MAX_AGE = "600"


def init_app(app: Flask, settings: Settings) -> None:
    if not settings.allowed_origins:
        return
    origins = set(settings.allowed_origins)
    any_origin = "*" in origins
    methods = ", ".join(settings.allowed_methods)
    headers = ", ".join(settings.allowed_headers)

    def allowed(origin: str) -> bool:
        return any_origin or origin in origins

    @app.before_request
    def answer_preflight() -> Response | None:
        origin = request.headers.get("Origin")
        wanted = request.headers.get("Access-Control-Request-Method")
        if request.method != "OPTIONS" or not origin or not wanted:
            return None
        response = Response(status=204)
        if allowed(origin):
            response.headers["Access-Control-Allow-Methods"] = (
                wanted if methods == "*" else methods)
            asked = request.headers.get("Access-Control-Request-Headers", "")
            response.headers["Access-Control-Allow-Headers"] = (
                asked if headers == "*" else headers)
            response.headers["Access-Control-Max-Age"] = MAX_AGE
        return response

    @app.after_request
    def tag_response(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin and allowed(origin):
            if any_origin and not settings.allow_credentials:
                response.headers["Access-Control-Allow-Origin"] = "*"
            else:
                response.headers["Access-Control-Allow-Origin"] = origin
                response.vary.add("Origin")
            if settings.allow_credentials:
                response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Access-Control-Expose-Headers"] = "X-Request-ID, Server-Timing"
        return response

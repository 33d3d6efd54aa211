"""API keys: ``Authorization: Bearer <key>`` on every model route, compared in constant time.

Keys are never logged or echoed; the error says only whether a key was missing or wrong.
"""
from __future__ import annotations

import hmac

from flask import current_app, request

from app.errors import AuthenticationFailed

EXTENSION = "flaskchat.api_keys"


def init_app(app: "object", keys: tuple[str, ...]) -> None:
    app.extensions[EXTENSION] = tuple(k.encode() for k in keys)  # type: ignore[attr-defined]


def require_api_key() -> None:
    """A before_request hook for the model blueprints. Preflights carry no credentials."""
    keys: tuple[bytes, ...] = current_app.extensions[EXTENSION]
    if not keys or request.method == "OPTIONS":
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it in the Authorization header as "
            "'Authorization: Bearer YOUR_KEY'.")
    if not _matches(token.strip().encode(), keys):
        raise AuthenticationFailed("Incorrect API key provided.")


def _matches(candidate: bytes, keys: tuple[bytes, ...]) -> bool:
    # Compare against every key so the time does not tell which one (or how many) matched.
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate, key)
    return found

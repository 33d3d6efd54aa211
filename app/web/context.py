"""The per-app and per-request objects the routes hand to the serving layer."""
from __future__ import annotations

from typing import TYPE_CHECKING

from flask import current_app, g

if TYPE_CHECKING:
    from app.serving.call import Call
    from app.upstream.clients import Upstream
    from schemas import RequestSchemas

UPSTREAM = "flaskchat.upstream"
SCHEMAS = "flaskchat.schemas"


def upstream() -> "Upstream":
    found: Upstream = current_app.extensions[UPSTREAM]
    return found


def schemas() -> "RequestSchemas":
    found: RequestSchemas = current_app.extensions[SCHEMAS]
    return found


def call() -> "Call":
    found: Call = g.call
    return found

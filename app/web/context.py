"""The per-app and per-request objects the routes hand to the serving layer."""
from __future__ import annotations

from flask import current_app, g

from app.serving.call import Call
from app.upstream import Upstream
from schemas import RequestSchemas

EXTENSION = "flaskchat"
SCHEMAS = "flaskchat.schemas"


def upstream() -> Upstream:
    found: Upstream = current_app.extensions[EXTENSION]
    return found


def schemas() -> RequestSchemas:
    found: RequestSchemas = current_app.extensions[SCHEMAS]
    return found


def call() -> Call:
    found: Call = g.call
    return found

"""GET /admin (the page) and its static files. They need no key: they hold nothing; every
figure they show comes from the admin API, which asks for an admin key."""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, redirect, send_from_directory
from flask.typing import ResponseReturnValue

from app.demo.routes import PAGE_HEADERS

PAGE_DIR = Path(__file__).resolve().parent / "static"

bp = Blueprint("admin_page", __name__)


@bp.get("/admin")
def page() -> ResponseReturnValue:
    return _file("index.html")


@bp.get("/admin/")
def page_with_slash() -> ResponseReturnValue:
    # The page's URLs are relative to /admin (so that a path prefix works behind a proxy).
    return redirect("../admin", 308)


@bp.get("/admin/static/<name>")
def asset(name: str) -> ResponseReturnValue:
    return _file(name)


def _file(name: str) -> Response:
    response = send_from_directory(PAGE_DIR, name, max_age=0)
    response.headers.update(PAGE_HEADERS)
    return response

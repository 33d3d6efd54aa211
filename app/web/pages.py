"""Plain HTML/JS pages the app serves itself (/demo, /admin): the page at /NAME, its files
at /NAME/static/<file>, with a strict Content-Security-Policy. They need no key: they hold
nothing; whatever they show comes from the API, with the key the person types."""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, redirect, send_from_directory
from flask.typing import ResponseReturnValue

# Only this origin's files and endpoints; no inline script, no framing.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def serve_page(bp: Blueprint, name: str, directory: Path) -> None:
    """Adds GET /NAME (index.html), /NAME/ (a redirect: the page's URLs are relative to
    /NAME, so that a path prefix works behind a proxy) and /NAME/static/<file>."""

    def file(filename: str) -> Response:
        response = send_from_directory(directory, filename, max_age=0)
        response.headers.update(PAGE_HEADERS)
        return response

    def page() -> ResponseReturnValue:
        return file("index.html")

    def page_with_slash() -> ResponseReturnValue:
        return redirect(f"../{name}", 308)

    def asset(filename: str) -> ResponseReturnValue:
        return file(filename)

    bp.add_url_rule(f"/{name}", "page", page, methods=["GET"])
    bp.add_url_rule(f"/{name}/", "page_with_slash", page_with_slash, methods=["GET"])
    bp.add_url_rule(f"/{name}/static/<filename>", "asset", asset, methods=["GET"])

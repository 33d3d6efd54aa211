"""GET /admin (the page) and its static files. Every figure the page shows comes from the
admin API, which asks for an admin key."""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint

from app.web.pages import serve_page

bp = Blueprint("admin_page", __name__)
serve_page(bp, "admin", Path(__file__).resolve().parent / "static")

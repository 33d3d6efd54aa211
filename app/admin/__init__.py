"""The admin page: keys with their limits and status, create and revoke, and tokens per
day per team; plain HTML and JS over the admin API (``/admin/v1``)."""
from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    from app.admin.routes import bp

    app.register_blueprint(bp)

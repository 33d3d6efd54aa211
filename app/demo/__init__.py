"""The browser demo page: its blueprint, stream tickets and static files."""
from __future__ import annotations

import os

from flask import Flask

from app.config import Settings


def init_app(app: Flask, settings: Settings) -> None:
    from app.demo.routes import EXTENSION, bp
    from app.demo.tickets import TicketStore
    from app.runtime import state_dir

    # Under gunicorn, the directory the arbiter made before it forked (shared by all
    # processes, so any of them can redeem a ticket another issued); else a private one.
    shared = settings.state_dir or os.environ.get(state_dir.STATE_ENV) or \
        state_dir.private_dir()
    tickets = state_dir.tickets_dir(shared)
    os.makedirs(tickets, mode=0o700, exist_ok=True)
    app.extensions[EXTENSION] = TicketStore(tickets, settings.demo_ticket_ttl)
    app.register_blueprint(bp)

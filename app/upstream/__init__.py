"""Upstream: the one pooled Session and the controller and worker clients built on it.

One instance per app, kept in ``app.extensions["flaskchat"]``; nothing here is global.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from app.upstream.controller import ControllerClient
from app.upstream.http import build_session
from app.upstream.worker import WorkerClient

if TYPE_CHECKING:
    from app.config import Settings

CONTROLLER_READ_TIMEOUT = 10.0


class Upstream:
    def __init__(self, settings: "Settings") -> None:
        self.settings = settings
        self.session = build_session(pool_size=settings.worker_connections)
        timeouts = (settings.connect_timeout, settings.read_timeout)
        # The controller answers from memory: a long wait means it is in trouble.
        controller_timeouts = (settings.connect_timeout, CONTROLLER_READ_TIMEOUT)
        self.controller = ControllerClient(self.session, settings.controller_address,
                                           controller_timeouts, ttl=settings.models_ttl)
        self.workers = WorkerClient(self.session, timeouts, info_ttl=settings.worker_info_ttl)

    def close(self) -> None:
        self.session.close()

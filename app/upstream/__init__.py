"""Upstream: the one pooled Session, and the controller, FastChat worker and
OpenAI-compatible upstream clients built on it.

One instance per app, kept in ``app.extensions["flaskchat"]``; nothing here is global.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from app.upstream.controller import ControllerClient
from app.upstream.health import WorkerHealth
from app.upstream.session import build_session
from app.upstream.openai_client import OpenAIClient
from app.upstream.openai_pool import OpenAIUpstreams
from app.upstream.openai_config import load_targets
from app.upstream.worker import Timing, WorkerClient

if TYPE_CHECKING:
    from app.config import Settings

CONTROLLER_READ_TIMEOUT = 10.0
# How often a waiting request looks at its client; a client that left is noticed in time
# to cancel its generation within a second.
TICK_SECONDS = 0.5


class Upstream:
    def __init__(self, settings: "Settings") -> None:
        self.settings = settings
        self.session = build_session(pool_size=settings.worker_connections)
        timeouts = (settings.connect_timeout, settings.read_timeout)
        # The controller answers from memory: a long wait means it is in trouble.
        controller_timeouts = (settings.connect_timeout, CONTROLLER_READ_TIMEOUT)
        self.health = WorkerHealth(self.session)
        self.controller = ControllerClient(
            self.session, settings.controller_address, controller_timeouts,
            ttl=settings.models_ttl, health=self.health,
            max_worker_in_flight=settings.max_worker_in_flight)
        self.workers = WorkerClient(self.session, timeouts, info_ttl=settings.worker_info_ttl,
                                    first_token_timeout=settings.first_token_timeout,
                                    generation_timeout=settings.generation_timeout)
        self.timing = Timing(tick=TICK_SECONDS, first_token=settings.first_token_timeout,
                             between_tokens=settings.read_timeout)
        self.openai = OpenAIUpstreams(
            load_targets(settings.openai_upstreams, settings.upstreams_file,
                         settings.connect_timeout),
            OpenAIClient(self.session), self.health)

    def close(self) -> None:
        self.session.close()

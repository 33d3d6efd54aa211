"""Upstream: the pooled Session and every client built on it, for one app (kept in
``app.extensions``; nothing here is global)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from app.scheduling.redis_slots import RedisSlots
from app.scheduling.slots import Lines, QueueObserver, Slots, Waits
from app.upstream.controller import ControllerClient
from app.upstream.failover import FailureLog, NoLog
from app.upstream.openai_client import OpenAIClient
from app.upstream.openai_config import Targets, load_targets
from app.upstream.openai_pool import OpenAIUpstreams
from app.upstream.server_health import ServerHealth
from app.upstream.session import build_session
from app.upstream.stream import Timing
from app.upstream.worker import WorkerClient

if TYPE_CHECKING:
    from app.config import Settings

CONTROLLER_READ_TIMEOUT = 10.0
# How often a waiting request looks at its client; a client that left is noticed in time
# to cancel its generation within a second.
TICK_SECONDS = 0.5


class Upstream:
    def __init__(self, settings: "Settings", failures: FailureLog | None = None,
                 targets: Targets | None = None,
                 queues: QueueObserver | None = None) -> None:
        """``targets``: the OpenAI-compatible upstreams, if already read (by the arbiter,
        which checked them); else they are read from the settings' flag and file."""
        self.settings = settings
        self.failures = failures or NoLog()
        self.session = build_session(pool_size=settings.worker_connections)
        timeouts = (settings.connect_timeout, settings.read_timeout)
        # The controller answers from memory: a long wait means it is in trouble.
        controller_timeouts = (settings.connect_timeout, CONTROLLER_READ_TIMEOUT)
        self.health = ServerHealth(self.session)
        self.controller = ControllerClient(
            self.session, settings.controller_address, controller_timeouts,
            ttl=settings.models_ttl, health=self.health,
            max_worker_in_flight=settings.max_worker_in_flight)
        self.timing = Timing(tick=TICK_SECONDS, first_token=settings.first_token_timeout,
                             between_tokens=settings.read_timeout)
        self.workers = WorkerClient(self.session, timeouts, info_ttl=settings.worker_info_ttl,
                                    timing=self.timing,
                                    generation_timeout=settings.generation_timeout,
                                    status_ttl=settings.models_ttl)
        self.capacities = settings.model_capacities
        waits = Waits(settings.max_waiting, settings.max_waiting_per_team,
                      (settings.queue_timeout, settings.queue_timeout,
                       settings.flex_queue_timeout))
        # Without Redis, each of the processes takes its share of every server (and with
        # it, while Redis cannot be reached).
        local = Slots(waits, settings.workers, observer=queues)
        self.slots: Lines = \
            RedisSlots(settings.redis_url, waits, local, queues) if settings.redis_url \
            else local
        if targets is None:
            targets = load_targets(settings.openai_upstreams, settings.upstreams_file,
                                   settings.connect_timeout)
        self.openai = OpenAIUpstreams(targets, OpenAIClient(self.session), self.health)

    def context_length(self, model: str) -> int | None:
        """The model's context length as last seen (its upstreams' configuration, or its
        workers' /model_details), without asking anyone: None if not known yet."""
        if self.openai.serves(model):
            return self.openai.context_length(model)
        return self.workers.context_length(model)

    def worker_capacity(self, address: str, model: str) -> int | None:
        """Generations the worker runs at once: as it says (through flaskchat's controller,
        at no cost; a stock controller's workers are asked, and that is cached), else
        --model-capacity, else None (not known: requests go to it at once, as FastChat's
        API server sends them)."""
        directory = self.controller.directory()
        said = self.workers.capacity(address) if directory.stock else \
            directory.capacities.get(address)
        return said or self.capacities.get(model)

    def close(self) -> None:
        self.session.close()

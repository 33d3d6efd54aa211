"""Access as one gateway process runs it: the database, the key store, the gate with its
limiter, and the admin keys, made from the settings and started and stopped with the
process."""
from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Engine

from app.access.budgets import Budgets
from app.access.database import engine_for, shown_url
from app.access.directory import KeyDirectory
from app.access.gate import Gate
from app.access.keys import KeyStore
from app.access.limits import Limiter, MemoryLimiter
from app.access.redis_limits import RedisLimiter
from app.access.retention import Pruner
from app.access.usage import UsageLedger
from app.config import Settings

log = logging.getLogger("flaskchat.access")


class AccessObserver(Protocol):
    """The gateway's metrics for access: refusals, and how the usage ledger fares."""

    def refused(self, reason: str) -> None: ...
    def buffered(self, records: int) -> None: ...
    def dropped(self, records: int) -> None: ...
    def rejected(self, records: int) -> None: ...


@dataclass
class Access:
    engine: Engine
    keys: KeyStore
    gate: Gate
    admin_keys: tuple[bytes, ...]
    pruner: Pruner

    def start(self) -> None:
        self.gate.directory.start()
        if self.gate.ledger is not None:
            self.gate.ledger.start()
        self.pruner.start()

    def stop(self) -> None:
        """On a graceful stop, after the last request: what is left of the limits'
        settlements goes to Redis, and what is left of the usage is written."""
        self.gate.limiter.drain()
        if self.gate.ledger is not None:
            self.gate.ledger.stop()

    def is_admin(self, token: str) -> bool:
        # Against every admin key, so the time tells nothing of which one or how many.
        found = False
        for key in self.admin_keys:
            found |= hmac.compare_digest(token.encode(), key)
        return found


def open_access(settings: Settings, observer: AccessObserver | None = None) -> Access:
    engine = engine_for(settings.database_url)
    store = KeyStore(engine)
    budgets = Budgets()
    directory = KeyDirectory(store, settings.api_keys, settings.keys_refresh, budgets,
                             settings.require_auth, shown_url(settings.database_url))
    limiter: Limiter = \
        RedisLimiter(settings.redis_url, settings.tpm_estimate, settings.workers) \
        if settings.redis_url else MemoryLimiter(settings.workers, settings.tpm_estimate)
    ledger = UsageLedger(engine, settings.usage_flush_interval, settings.usage_buffer,
                         observer, written=budgets.written)
    return Access(engine, store, Gate(directory, limiter, budgets, ledger, observer),
                  tuple(key.encode() for key in settings.admin_keys),
                  Pruner(engine, settings.usage_retention))

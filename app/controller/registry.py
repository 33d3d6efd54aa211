"""The controller's worker registry: registration, heartbeats, expiry and dispatch.

State is in memory, as in FastChat: after a restart, workers come back on their next
heartbeat (they are told ``exist: false`` and re-register). Unlike FastChat, a worker
whose heartbeat is overdue is never dispatched to, even before the sweep removes it, and
``speed: 0`` cannot divide by zero.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

log = logging.getLogger("flaskchat.controller")

StatusFetcher = Callable[[str], "dict[str, Any] | None"]


@dataclass
class WorkerRecord:
    name: str
    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    multimodal: bool
    last_heart_beat: float
    order: int = 0  # registration order, FastChat's tie-break
    capacity: int | None = None  # its limit_worker_concurrency, where it says

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model_names": self.model_names, "speed": self.speed,
                "queue_length": self.queue_length, "check_heart_beat": self.check_heart_beat,
                "multimodal": self.multimodal, "last_heart_beat": self.last_heart_beat,
                "limit_worker_concurrency": self.capacity}


@dataclass
class Registry:
    dispatch_method: str
    expiration: float
    fetch_status: StatusFetcher
    clock: Callable[[], float] = time.time
    _workers: dict[str, WorkerRecord] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counter: int = 0

    # ---- membership -------------------------------------------------------------------

    def register(self, name: str, check_heart_beat: bool, status: dict[str, Any] | None,
                 multimodal: bool) -> bool:
        name = name.rstrip("/")
        if status is None:
            status = self.fetch_status(name)
            if status is None:
                log.warning("not registering %s: its /worker_get_status failed", name)
                return False
        with self._lock:
            self._counter += 1
            self._workers[name] = WorkerRecord(
                name=name, model_names=list(status["model_names"]),
                speed=float(status.get("speed", 1.0)),
                queue_length=int(status.get("queue_length", 0)),
                check_heart_beat=check_heart_beat, multimodal=multimodal,
                last_heart_beat=self.clock(), order=self._counter,
                capacity=_capacity(status.get("limit_worker_concurrency")))
        log.info("registered worker %s for %s", name, ", ".join(status["model_names"]))
        return True

    def heartbeat(self, name: str, queue_length: int) -> bool:
        """False for a worker not registered, or overdue (it is dead to dispatch already,
        and forgotten now): it registers again, with its status read afresh."""
        now = self.clock()
        with self._lock:
            record = self._workers.get(name.rstrip("/"))
            if record is None:
                return False
            if record.check_heart_beat and record.last_heart_beat < now - self.expiration:
                del self._workers[record.name]
                return False
            record.queue_length = queue_length
            record.last_heart_beat = now
            return True

    def remove_stale(self) -> list[str]:
        deadline = self.clock() - self.expiration
        with self._lock:
            stale = [n for n, r in self._workers.items()
                     if r.check_heart_beat and r.last_heart_beat < deadline]
            for name in stale:
                del self._workers[name]
        for name in stale:
            log.warning("removed worker %s: no heartbeat for %.0f s", name, self.expiration)
        return stale

    def refresh_all(self) -> None:
        """Re-polls every worker (concurrently) and keeps those that answer."""
        with self._lock:
            previous = list(self._workers.values())
            self._workers.clear()
        threads = [threading.Thread(target=self.register, args=(
            r.name, r.check_heart_beat, None, r.multimodal), daemon=True) for r in previous]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    # ---- queries ------------------------------------------------------------------------

    def live_workers(self) -> list[WorkerRecord]:
        deadline = self.clock() - self.expiration
        with self._lock:
            return [r for r in sorted(self._workers.values(), key=lambda r: r.order)
                    if not r.check_heart_beat or r.last_heart_beat >= deadline]

    def models(self, multimodal: bool | None = None) -> list[str]:
        names: dict[str, None] = {}
        for record in self.live_workers():
            if multimodal is None or record.multimodal == multimodal:
                names.update(dict.fromkeys(record.model_names))
        return list(names)

    def status(self) -> dict[str, Any]:
        workers = self.live_workers()
        return {"model_names": sorted(set(m for r in workers for m in r.model_names)),
                "speed": sum(r.speed for r in workers),
                "queue_length": sum(r.queue_length for r in workers)}

    # ---- dispatch ---------------------------------------------------------------------

    def pick(self, model: str, exclude: Iterable[str] = ()) -> str:
        """A worker URL for ``model``, or "" when there is none (FastChat's answer)."""
        excluded = set(exclude)
        candidates = [r for r in self.live_workers()
                      if model in r.model_names and r.name not in excluded]
        if not candidates:
            return ""
        if self.dispatch_method == "lottery":
            weights = [max(r.speed, 0.0) for r in candidates]
            if sum(weights) < 1e-4:
                return random.choice(candidates).name
            return random.choices(candidates, weights=weights)[0].name
        chosen = min(candidates, key=lambda r: (r.queue_length / max(r.speed, 1e-3), r.order))
        with self._lock:
            # Counted until the next heartbeat reports the worker's real queue.
            chosen.queue_length += 1
        return chosen.name


def _capacity(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 \
        else None

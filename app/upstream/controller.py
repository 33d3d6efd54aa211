"""ControllerClient: which models exist and which worker serves a request.

Against flaskchat's controller, the gateway fetches every worker with its models
(``/list_workers``) into a cache refreshed in the background, and picks a worker itself
from its own in-flight counts: no controller call on the hot path. Against a stock
FastChat controller (no ``/list_workers``), the model list is cached the same way and each
request makes exactly one ``/get_worker_address`` call, which keeps FastChat's balancing.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import requests

from app.errors import (APIError, ModelNotFound, Overloaded, UpstreamError, UpstreamTimeout,
                        UpstreamUnavailable, WorkerUnreachable)
from app.upstream.cache import RefreshingCache
from app.upstream.server_health import ServerHealth
from app.upstream.session import mapped_errors, post_json

log = logging.getLogger("flaskchat.controller_client")

# A model missing from the cache triggers at most one synchronous refresh this often.
MISSING_MODEL_REFRESH_INTERVAL = 1.0


@dataclass(frozen=True)
class WorkerInfo:
    address: str
    model_names: tuple[str, ...]
    speed: float = 1.0
    multimodal: bool = False
    last_heart_beat: float | None = None
    capacity: int | None = None  # generations it runs at once, where it says


@dataclass
class Directory:
    """One snapshot of the controller's view. ``workers`` is empty for a stock controller."""

    models: list[str]
    multimodal: set[str] = field(default_factory=set)
    workers: dict[str, list[WorkerInfo]] = field(default_factory=dict)
    stock: bool = False
    capacities: dict[str, int] = field(default_factory=dict)  # address -> as it says


class ControllerClient:
    def __init__(self, session: requests.Session, address: str, timeouts: tuple[float, float],
                 ttl: float, health: ServerHealth, max_worker_in_flight: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._session = session
        self.address = address
        self._timeouts = timeouts
        self._clock = clock
        self._ttl = ttl
        self._directory: RefreshingCache[str, Directory] = RefreshingCache(
            self._fetch_directory, ttl, clock)
        self._stock: bool | None = None  # unknown until the first refresh
        self._in_flight: dict[str, int] = {}
        self._health = health
        self._max_in_flight = max_worker_in_flight
        self._last_address: dict[str, str] = {}  # stock controller: the last worker per model
        self._last_forced_refresh = -MISSING_MODEL_REFRESH_INTERVAL

    # ---- what exists ---------------------------------------------------------------

    def directory(self) -> Directory:
        return self._directory.get("")

    def status(self) -> dict[str, Any]:
        """For /ready: the models known, the workers known for each (flaskchat's controller
        only), and the error if the controller cannot be reached now (then the models are
        those last seen). A stale view is refreshed first."""
        age = self._directory.age("")
        if age is None or age > self._ttl:
            try:
                self._directory.load("")
            except APIError:
                if self._directory.peek("") is None:
                    raise
        cached = self._directory.peek("")
        return {"models": cached.models if cached else [],
                "workers": {model: len(infos) for model, infos in cached.workers.items()}
                if cached else {},
                "error": self._directory.errors.get("")}

    def require_model(self, model: str) -> Directory:
        directory = self.directory()
        if model in directory.models:
            return directory
        # A worker may have registered since the last refresh: look once more, rate-limited.
        now = self._clock()
        if now - self._last_forced_refresh >= MISSING_MODEL_REFRESH_INTERVAL:
            self._last_forced_refresh = now
            try:
                directory = self._directory.load("")
            except APIError:
                if self._directory.peek("") is None:
                    raise  # nothing known at all: the controller's failure is the answer
            if model in directory.models:
                return directory
        raise ModelNotFound(f"The model '{model}' does not exist.", "model",
                            available=tuple(directory.models))

    def knows(self, model: str) -> bool:
        """Whether the last view listed ``model``; never waits for the controller."""
        cached = self._directory.peek("")
        return cached is not None and model in cached.models

    def is_multimodal(self, model: str) -> bool:
        return model in self.directory().multimodal

    # ---- which worker --------------------------------------------------------------

    def acquire(self, model: str, exclude: Iterable[str] = ()) -> str:
        """A worker address for ``model``; call :meth:`release` when the request ends."""
        directory = self.require_model(model)
        if directory.stock:
            address = self._ask_controller(model, exclude)
        else:
            address = self._pick_locally(directory.workers.get(model, []), model, exclude)
        self._in_flight[address] = self._in_flight.get(address, 0) + 1
        return address

    def release(self, address: str) -> None:
        count = self._in_flight.get(address, 0) - 1
        if count > 0:
            self._in_flight[address] = count
        else:
            self._in_flight.pop(address, None)

    def mark_failed(self, address: str, unreachable: bool = False) -> None:
        """Skip ``address`` until it shows life again (see ServerHealth)."""
        heartbeat = None
        cached = self._directory.peek("")
        for info in (cached.workers.values() if cached else ()):
            heartbeat = next((w.last_heart_beat for w in info if w.address == address),
                             heartbeat)
        self._health.failed(address, heartbeat, unreachable)
        self._directory.refresh_soon("")

    def _pick_locally(self, workers: list[WorkerInfo], model: str,
                      exclude: Iterable[str]) -> str:
        excluded = set(exclude)
        candidates = [w for w in workers if w.address not in excluded]
        if not candidates:
            raise UpstreamUnavailable(f"No worker is available for model '{model}'.",
                                      headers={"Retry-After": "2"})
        # Workers that failed recently are skipped while others can serve. When none can,
        # one that answered with a server error is tried rather than refusing everything;
        # one that refused a connection or hung is not (it is down until a probe says not).
        candidates = [w for w in candidates if self._health.healthy(w.address)] or \
            [w for w in candidates if self._health.reachable(w.address)]
        if not candidates:
            raise UpstreamUnavailable(f"No worker for model '{model}' can be reached now.",
                                      headers={"Retry-After": "2"})
        open_ones = [w for w in candidates if self._has_room(w.address)]
        if not open_ones:
            raise Overloaded(f"Every worker for model '{model}' is busy; retry shortly.",
                             headers={"Retry-After": "1"})
        # Fewest requests in flight from this process per unit of speed; ties at random so
        # that several gateway processes do not all pick the same worker.
        return min(open_ones, key=lambda w: (
            self._in_flight.get(w.address, 0) / max(w.speed, 1e-3), random.random())).address

    def _has_room(self, address: str) -> bool:
        return not self._max_in_flight or \
            self._in_flight.get(address, 0) < self._max_in_flight

    def _ask_controller(self, model: str, exclude: Iterable[str]) -> str:
        excluded = set(exclude)
        unhealthy = ""
        try:
            for _ in range(3):  # it may hand back a worker we cannot use; ask again
                address = self._post("/get_worker_address", {"model": model}).get("address")
                if not isinstance(address, str):
                    raise UpstreamError("The controller's /get_worker_address answer has no "
                                        "address.")
                if not address:
                    raise UpstreamUnavailable(f"No worker is available for model '{model}'.")
                address = address.rstrip("/")
                if address in excluded:
                    continue
                if not self._health.healthy(address):
                    if self._health.reachable(address):
                        unhealthy = address
                    continue
                if not self._has_room(address):
                    raise Overloaded(f"Every worker for model '{model}' is busy; retry "
                                     "shortly.", headers={"Retry-After": "1"})
                self._last_address[model] = address
                return address
        except (WorkerUnreachable, UpstreamTimeout):
            # The controller is down: the worker it gave last time may still be fine.
            known = self._last_address.get(model)
            if known and known not in excluded and self._health.healthy(known):
                return known
            raise
        if unhealthy:
            return unhealthy  # only failing ones: try one rather than refuse
        raise UpstreamUnavailable(f"No other worker is available for model '{model}'.")

    # ---- talking to the controller ---------------------------------------------------

    def _fetch_directory(self, _key: str) -> Directory:
        if self._stock is not True:
            try:
                body = self._post("/list_workers", {})
                self._stock = False
                directory = _directory_from_workers(body)
                for infos in directory.workers.values():
                    for info in infos:
                        if info.last_heart_beat is not None:
                            self._health.saw_heartbeat(info.address, info.last_heart_beat)
                return directory
            except _NotOurs:
                log.info("controller at %s is a stock FastChat controller", self.address)
                self._stock = True
        models = self._post("/list_models", {}).get("models")
        if not isinstance(models, list):
            raise UpstreamError("The controller's /list_models answer has no model list.")
        try:
            multimodal = set(self._post("/list_multimodal_models", {}).get("models") or ())
        except (UpstreamError, _NotOurs):
            multimodal = set()
        return Directory(models=sorted(set(str(m) for m in models)), multimodal=multimodal,
                         stock=True)

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        with mapped_errors("the controller"):
            response = post_json(self._session, self.address + path, payload, self._timeouts)
            if response.status_code in (404, 405):
                raise _NotOurs(path)
            if response.status_code != 200:
                raise UpstreamError(f"The controller answered {path} with HTTP "
                                    f"{response.status_code}.")
            try:
                body = response.json()
            except ValueError:
                raise UpstreamError(f"The controller answered {path} with invalid JSON.") \
                    from None
        return body if isinstance(body, dict) else {}


class _NotOurs(Exception):
    """The controller has no such endpoint (a stock FastChat controller)."""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _capacity(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 \
        else None


def _directory_from_workers(body: dict[str, Any]) -> Directory:
    workers: dict[str, list[WorkerInfo]] = {}
    multimodal: set[str] = set()
    capacities: dict[str, int] = {}
    for item in body.get("workers") or ():
        try:
            info = WorkerInfo(address=str(item["name"]).rstrip("/"),
                              model_names=tuple(str(m) for m in item["model_names"]),
                              speed=float(item.get("speed") or 1.0),
                              multimodal=bool(item.get("multimodal")),
                              last_heart_beat=_number(item.get("last_heart_beat")),
                              capacity=_capacity(item.get("limit_worker_concurrency")))
        except (KeyError, TypeError, ValueError):
            log.warning("skipping malformed worker entry from the controller: %r", item)
            continue
        if info.capacity is not None:
            capacities[info.address] = info.capacity
        for model in info.model_names:
            workers.setdefault(model, []).append(info)
            if info.multimodal:
                multimodal.add(model)
    return Directory(models=sorted(workers), multimodal=multimodal, workers=workers,
                     capacities=capacities)

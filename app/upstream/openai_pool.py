"""Which OpenAI-compatible upstream serves a request: the least busy healthy one for the
model (in-flight requests per unit of weight), ties shared by smooth weighted round robin,
so that idle traffic also spreads by weight. A failed upstream is skipped until a probe of
its /models answers (``ServerHealth``), as a failed FastChat worker is."""
from __future__ import annotations

import threading
from functools import partial
from typing import Iterable

from app.errors import ModelNotFound, UpstreamUnavailable
from app.upstream.openai_client import OpenAIClient
from app.upstream.openai_config import OpenAITarget, Targets
from app.upstream.server_health import ServerHealth


class OpenAIUpstreams:
    def __init__(self, targets: Targets, client: OpenAIClient, health: ServerHealth) -> None:
        self.client = client
        self._targets = targets
        self._health = health
        self._in_flight: dict[OpenAITarget, int] = {}
        self._credit: dict[OpenAITarget, float] = {}  # smooth weighted round robin
        self._lock = threading.Lock()

    def models(self) -> list[str]:
        return list(self._targets)

    def serves(self, model: str) -> bool:
        return model in self._targets

    def context_length(self, model: str) -> int | None:
        """The least context length its upstreams' entries give (None: none gives one)."""
        lengths = [t.context_length for t in self._targets.get(model, ())
                   if t.context_length is not None]
        return min(lengths) if lengths else None

    def healthy_models(self) -> list[str]:
        return [model for model, targets in self._targets.items()
                if any(self._health.healthy(t.server) for t in targets)]

    def acquire(self, model: str, exclude: Iterable[OpenAITarget] = ()) -> OpenAITarget:
        targets = self._targets.get(model)
        if targets is None:
            raise ModelNotFound(f"The model '{model}' does not exist.", "model")
        skipped = set(exclude)
        candidates = [t for t in targets if t not in skipped]
        pool = ([t for t in candidates if self._health.healthy(t.server)]
                or [t for t in candidates if self._health.reachable(t.server)])
        if not pool:
            raise UpstreamUnavailable(f"No upstream server for the model '{model}' is "
                                      "reachable right now; retry shortly.")
        with self._lock:
            least = min(self._load(t) for t in pool)
            tied = [t for t in pool if self._load(t) == least]
            chosen = tied[0] if len(tied) == 1 else self._round_robin(tied)
            self._in_flight[chosen] = self._in_flight.get(chosen, 0) + 1
        return chosen

    def release(self, target: OpenAITarget) -> None:
        with self._lock:
            self._in_flight[target] = max(self._in_flight.get(target, 0) - 1, 0)

    def mark_failed(self, target: OpenAITarget, unreachable: bool = False) -> None:
        self._health.failed(target.server, unreachable=unreachable,
                            probe=partial(self.client.answers, target))

    def _load(self, target: OpenAITarget) -> float:
        return self._in_flight.get(target, 0) / target.weight

    def _round_robin(self, tied: list[OpenAITarget]) -> OpenAITarget:
        total = sum(t.weight for t in tied)
        for target in tied:
            self._credit[target] = self._credit.get(target, 0.0) + target.weight
        chosen = max(tied, key=lambda t: self._credit[t])
        self._credit[chosen] -= total
        return chosen

"""Call: what the serving layer knows about the request it works for.

Generators outlive Flask's request context, so the request id and the timing travel in
this object instead of ``flask.g``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from time import perf_counter
from typing import Callable, FrozenSet

from app.errors import ModelNotFound


def _never_gone() -> bool:
    """For calls made outside a client's request (tests, background work)."""
    return False


@dataclass
class Call:
    request_id: str
    client_gone: Callable[[], bool] = _never_gone  # whether the client has disconnected
    started: float = field(default_factory=perf_counter)
    upstream_seconds: float = 0.0  # time spent waiting on the controller and workers
    model: str = ""  # as the client named it, once the request is read
    first_token_at: float | None = None  # streams: when the first generated text went out
    prompt_tokens: int = 0  # as the worker counted them (0: not known)
    completion_tokens: int = 0
    # The models the request's key may use (None: every model).
    allowed_models: FrozenSet[str] | None = None
    key_id: str | None = None  # the request's key (None: no key, or a --api-keys key)

    def use_model(self, model: str) -> None:
        """The request is for ``model``; a model its key may not use is, as OpenAI answers,
        a model that does not exist for it."""
        self.model = model
        if self.allowed_models is not None and model not in self.allowed_models:
            raise ModelNotFound(f"The model '{model}' does not exist or you do not have "
                                "access to it.", "model")

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = perf_counter()

    def waiting_upstream(self) -> "_Waiting":
        """``with call.waiting_upstream():`` around a wait on the controller or a worker."""
        return _Waiting(self)

    def server_timing(self) -> str:
        """The Server-Timing header: the gateway's own time and the time spent upstream."""
        total = perf_counter() - self.started
        own = max(total - self.upstream_seconds, 0.0)
        return f"gateway;dur={own * 1000:.2f}, upstream;dur={self.upstream_seconds * 1000:.2f}"


class _Waiting:
    """Adds the time spent in its block to the call's upstream time (a class: entered
    several times a request, and a generator-based context manager costs four times as
    much)."""

    __slots__ = ("_call", "_began")

    def __init__(self, call: Call) -> None:
        self._call = call
        self._began = 0.0

    def __enter__(self) -> None:
        self._began = perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._call.upstream_seconds += perf_counter() - self._began

"""Call: what the serving layer knows about the request it works for.

Generators outlive Flask's request context, so the request id, the timing and the usage
travel in this object instead of ``flask.g``. Every path hands what its request used to
``call.meter``; one step reads it when the request ends (``app.web.request_end``), so no
path charges, records or counts anything itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Callable, FrozenSet

from app.errors import ModelNotFound


def _never_gone() -> bool:
    """For calls made outside a client's request (tests, background work)."""
    return False


class Meter:
    """What the request used, as its upstreams said or as the gateway saw it pass."""

    __slots__ = ("prompt_tokens", "completion_tokens", "counted", "unseen", "wasted_prompt",
                 "wasted_completion")

    def __init__(self) -> None:
        self.prompt_tokens = 0  # as the worker or upstream counted them (0: not known)
        self.completion_tokens = 0  # likewise
        self.counted = 0  # completion tokens seen passing, where no usage came
        # An upstream was generating when the client left and could not say how much it
        # had made (a non-stream OpenAI-compatible answer): its ceiling is charged.
        self.unseen = False
        # What an attempt that failed made before it failed (the others of its n that
        # finished): charged on top of what the request reports in the end.
        self.wasted_prompt = 0
        self.wasted_completion = 0

    def report(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The usage a worker or upstream reported (the whole request's, so far)."""
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        """One of the request's generations reported what it made: its prompt is the
        request's (each choice reads the same one), its completion adds up."""
        self.prompt_tokens = max(self.prompt_tokens, prompt_tokens)
        self.completion_tokens += completion_tokens

    def wasted(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.wasted_prompt += prompt_tokens
        self.wasted_completion += completion_tokens

    def prompt(self) -> int:
        """The prompt tokens its upstreams counted (0: not known)."""
        return self.prompt_tokens + self.wasted_prompt

    def completion(self) -> int:
        """What the request made: its upstreams' count, else what was seen passing."""
        return (self.completion_tokens or self.counted) + self.wasted_completion


# The admission step serving calls once it knows the model and the reply's size:
# (call, max_tokens per choice or None, choices, the model's context or None) -> the
# budget's cap on max_tokens per choice, or None.
Admission = Callable[["Call", "int | None", int, "int | None"], "int | None"]


@dataclass
class Call:
    request_id: str
    client_gone: Callable[[], bool] = _never_gone  # whether the client has disconnected
    started: float = field(default_factory=perf_counter)
    upstream_seconds: float = 0.0  # time spent waiting on the controller and workers
    model: str = ""  # as the client named it, once the request is read
    first_token_at: float | None = None  # streams: when the first generated text went out
    meter: Meter = field(default_factory=Meter)
    # The models the request's key may use (None: every model).
    allowed_models: FrozenSet[str] | None = None
    owner: str = ""  # who owns what the request stores ("": the anonymous owner)
    # Set for model requests by app.web.access: checks the key's limits and reserves.
    admission: Admission | None = None
    admitted: Any = None  # what admission granted (an app.access.gate.Pass)
    prompt_bytes: int | None = None  # the prompt's size, where not the body's
    extra_prompt_bytes: int = 0  # replayed from earlier turns (previous_response_id)
    requested_tier: str | None = None  # the service_tier the client asked for
    # Who the request waits as for a busy model's slots, and the tier it is served at
    # (set by admission, from the key and requested_tier).
    place: Any = None  # an app.scheduling.slots.Place
    # The app.scheduling.slots.Held slots it holds on servers (an embeddings request's
    # batches may hold several at once).
    held: list[Any] = field(default_factory=list)
    queued: bool = False  # it went through a server's line (whose capacity is known)
    queue_seconds: float = 0.0  # time spent waiting for a slot
    trace: Any = None  # its spans (an app.telemetry.tracing.Trace), when tracing is on

    @property
    def service_tier(self) -> str:
        """The tier the request is served at, as responses say it."""
        return self.place.tier if self.place is not None else "default"

    def release_slot(self, used: float | None) -> None:
        """Gives back the request's slots (``used``: the tokens it used, where known,
        counted once)."""
        while self.held:
            self.held.pop().release(used)
            used = None

    def use_model(self, model: str) -> None:
        """The request is for ``model``; a model its key may not use is, as OpenAI answers,
        a model that does not exist for it."""
        self.model = model
        if self.allowed_models is not None and model not in self.allowed_models:
            raise ModelNotFound(f"The model '{model}' does not exist or you do not have "
                                "access to it.", "model")

    def admit(self, model: str, max_tokens: int | None = None, choices: int = 1,
              context: int | None = None, tier: str | None = None) -> int | None:
        """The request is for ``model`` and asks for up to ``max_tokens`` per choice: its
        key's limits are checked and its worst case reserved (a 429 if they do not let it
        in). Returns the most tokens per choice its budget allows, for the model, or None
        (as asked). ``tier``: the service_tier asked for. Once per request: a second call
        returns the first's answer."""
        self.use_model(model)
        if tier is not None:
            self.requested_tier = tier
        if self.admission is None:
            return None
        if self.admitted is not None:
            cap: int | None = self.admitted.cap
            return cap
        return self.admission(self, max_tokens, choices, context)

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
        own = max(total - self.upstream_seconds - self.queue_seconds, 0.0)
        timing = f"gateway;dur={own * 1000:.2f}, upstream;dur={self.upstream_seconds * 1000:.2f}"
        if self.queued:
            timing += f", queue;dur={self.queue_seconds * 1000:.2f}"
        return timing


def capped(max_tokens: int | None, cap: int | None) -> int | None:
    """The max_tokens to send: the client's, or the budget's cap when it set none."""
    return max_tokens if cap is None else cap


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

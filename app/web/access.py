"""Keys on the way in, their charge on the way out.

``require_api_key`` (before every model route): ``Authorization: Bearer <key>`` names the
principal. A POST (a request for a model) gets its admission step on the request's Call:
serving calls it once it knows the model and the reply's size, and the key's limits and
budget then decide whether it may go on (a 429 if not) and reserve its worst case; the
response carries the ``x-ratelimit-*`` headers. When the response is closed (a stream
when it ends), ``charge`` settles the reservation to what the request used, charges the
budget and writes the usage record (``app.web.request_end`` calls it).
``require_admin_key`` guards the admin API and the operator views: admin keys only; an
ordinary key is a 403. Keys are never logged or echoed.
"""
from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING

from flask import Flask, current_app, g, request

from app.access.keys import now
from app.access.limits import KeyLimits
from app.access.reservations import Ask, estimate_tokens
from app.access.usage import UsageRecord
from app.errors import AuthenticationFailed, PermissionDenied
from app.scheduling.slots import Place
from app.scheduling.tiers import granted_tier
from app.web.context import call

if TYPE_CHECKING:
    from app.access.directory import Principal
    from app.access.gate import Gate, Pass
    from app.access.service import Access
    from app.serving.call import Call
    from app.telemetry.metrics import AccessMetrics

EXTENSION = "flaskchat.access"
METRICS = "flaskchat.access_metrics"


def init_app(app: Flask, access: "Access", metrics: "AccessMetrics | None") -> None:
    app.extensions[EXTENSION] = access
    app.extensions[METRICS] = metrics


def access() -> "Access":
    found: Access = current_app.extensions[EXTENSION]
    return found


def bearer_token() -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def authenticate() -> "Principal | None":
    """Who the request is from (None for a CORS preflight, which carries no
    credentials); the models its key may use and its owner go on the request's Call."""
    if request.method == "OPTIONS":
        return None
    principal = access().gate.authenticate(bearer_token())
    identify(call(), principal)
    return principal


def identify(current: "Call", principal: "Principal") -> None:
    current.allowed_models = principal.models
    current.owner = principal.owner


def require_api_key() -> None:
    """A before_request hook for the model blueprints."""
    principal = authenticate()
    g.principal = principal
    if principal is not None and request.method == "POST":
        charge_to(principal)


def count_request() -> None:
    """A request that is not for a model but reads the database (a stored response):
    it counts toward its key's rpm (a 429 past it), and holds nothing."""
    principal: Principal | None = g.get("principal")
    if principal is not None and principal.limits.rpm:
        counted = replace(principal, limits=KeyLimits(rpm=principal.limits.rpm))
        access().gate.admit(counted, Ask(0, 0, reserves=False))


def charge_to(principal: "Principal", counts_request: bool = True) -> None:
    """The request is for a model: it is recorded and charged to ``principal``, and its
    admission waits on its Call for serving to call (``counts_request``: False for a demo
    stream, whose ticket was counted as the request)."""
    g.usage_principal = principal
    call().admission = partial(_admit, access().gate, principal, counts_request)


def _admit(gate: "Gate", principal: "Principal", counts_request: bool, current: "Call",
           max_tokens: int | None, choices: int, context: int | None) -> int | None:
    size = current.prompt_bytes if current.prompt_bytes is not None \
        else len(request.get_data(cache=True))  # bytes read: a chunked body counts too
    ask = Ask(estimate_tokens(size + current.extra_prompt_bytes), max_tokens, choices,
              context, counts_request)
    admitted = gate.admit(principal, ask)
    current.admitted = admitted
    current.place = place_of(principal, current.requested_tier, ask.prompt, choices)
    return admitted.cap


def place_of(principal: "Principal", requested: str | None, cost: float,
             generations: int = 1) -> Place:
    """Who the request waits as, for a busy model: its tenant (team, else key) with the
    tenant's weight, at the tier asked for, never above the key's highest. ``cost``: its
    prompt, counted when it gets a slot; what it generates is counted when it ends (as
    the virtual token counter counts output as it is made, a reply is not guessed).
    ``generations``: the slots it takes, one per generation it runs at once (n)."""
    return Place(principal.tenant, principal.weight,
                 granted_tier(requested, principal.default_tier, principal.max_tier), cost,
                 max(generations, 1))


def admit_ticket(principal: "Principal", body_bytes: int) -> None:
    """A demo ticket counts as a request of its key (rpm) and is refused as its stream
    would be, but holds nothing: its stream reserves when it opens."""
    access().gate.admit(principal, Ask(estimate_tokens(body_bytes), None, reserves=False))


def require_admin_key() -> None:
    """A before_request hook for the admin API (and a check for operator views)."""
    if request.method == "OPTIONS":
        return
    found = access()
    token = bearer_token()
    if not found.admin_keys:
        raise PermissionDenied("The admin API is closed: start the gateway with "
                               "--admin-keys-file (or FLASKCHAT_ADMIN_KEYS) to open it.")
    if not token:
        raise AuthenticationFailed("You didn't provide an admin key. Send it in the "
                                   "Authorization header as 'Authorization: Bearer KEY'.")
    if found.is_admin(token):
        return
    found.gate.authenticate(token)  # a wrong key is a 401; a valid ordinary key, a 403
    raise PermissionDenied("This key cannot use the admin API: it needs an admin key "
                           "(--admin-keys-file).")


def charge(gate: "Gate", metrics: "AccessMetrics | None", current: "Call",
           principal: "Principal", route: str, status: int, model: str | None,
           latency: float, ttft: float | None) -> tuple[int, int]:
    """The request ended: what it used, settled, charged and recorded; returns the
    (prompt, completion) tokens charged. Where an upstream did not count the prompt, the
    estimate made at admission is charged for a request that reached the model. Runs
    when the response closes, after the request context is gone."""
    admitted: Pass | None = current.admitted
    current.admitted = None  # settled once
    meter = current.meter
    prompt, completion = meter.prompt(), meter.completion()
    if admitted is not None:
        if meter.unseen and not completion:
            completion = admitted.completion_ceiling()
        if not prompt and (status < 400 or completion):
            prompt = admitted.ask.prompt
        gate.finish(admitted, prompt, completion)
    gate.record(UsageRecord(
        created_at=now() - timedelta(seconds=latency), key_id=principal.key_id,
        key_name=principal.name, team=principal.team, model=model, route=route,
        status=status, prompt_tokens=prompt, completion_tokens=completion,
        latency_ms=latency * 1000, ttft_ms=ttft * 1000 if ttft is not None else None,
        request_id=current.request_id,
        span=current.trace.link if current.trace is not None else None))
    if metrics is not None:
        metrics.used(principal.name, prompt, completion)
    return prompt, completion


def key_metrics() -> "AccessMetrics | None":
    found: AccessMetrics | None = current_app.extensions.get(METRICS)
    return found


def release_unfinished(current: "Call") -> None:
    """A request that ended before its response was handed over: what it reserved is
    given back (it made nothing)."""
    admitted: Pass | None = current.admitted
    if admitted is not None:
        current.admitted = None
        access().gate.finish(admitted, 0, 0)

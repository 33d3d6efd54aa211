"""Keys on the way in, usage on the way out.

``require_api_key`` (before every model route): ``Authorization: Bearer <key>`` names the
principal; a POST (a request for a model) must also pass its key's limits and budget, and
its response carries the ``x-ratelimit-*`` headers. When the response is closed (a stream
when it ends), the request's tokens settle its limits and budget and its usage record goes
to the ledger. ``require_admin_key`` guards the admin API: admin keys only; an ordinary
key is a 403. Keys are never logged or echoed.
"""
from __future__ import annotations

from datetime import timedelta
from functools import partial
from time import perf_counter
from typing import TYPE_CHECKING

from flask import Flask, Response, current_app, g, request

from app.errors import AuthenticationFailed, PermissionDenied
from app.web.context import call, upstream

if TYPE_CHECKING:
    from app.access.directory import Principal
    from app.access.gate import Gate, Pass
    from app.access.service import Access
    from app.serving.call import Call
    from app.telemetry.metrics import AccessMetrics
    from app.upstream.clients import Upstream

EXTENSION = "flaskchat.access"
METRICS = "flaskchat.access_metrics"


def init_app(app: Flask, access: "Access", metrics: "AccessMetrics | None") -> None:
    app.extensions[EXTENSION] = access
    app.extensions[METRICS] = metrics
    app.after_request(_hand_over)
    app.teardown_request(_finish_unless_handed_over)


def access() -> "Access":
    found: Access = current_app.extensions[EXTENSION]
    return found


def bearer_token() -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def authenticate() -> "Principal | None":
    """Who the request is from (None for a CORS preflight, which carries no
    credentials); the models its key may use go on the request's Call."""
    if request.method == "OPTIONS":
        return None
    principal = access().gate.authenticate(bearer_token())
    current = call()
    current.allowed_models = principal.models
    current.key_id = principal.key_id
    return principal


def require_api_key() -> None:
    """A before_request hook for the model blueprints."""
    principal = authenticate()
    if principal is not None and request.method == "POST":
        admit_key(principal, request.content_length or 0)


def admit_key(principal: "Principal", body_bytes: int) -> None:
    """The request is for a model: it is recorded, and its key's limits decide whether it
    may go on (a 429 if not)."""
    g.usage_principal = principal
    g.access_pass = access().gate.admit(principal, body_bytes)


def require_admin_key() -> None:
    """A before_request hook for the admin API."""
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


def _hand_over(response: Response) -> Response:
    admitted: Pass | None = g.pop("access_pass", None)
    principal: Principal | None = g.pop("usage_principal", None)
    if admitted is not None:
        response.headers.extend(admitted.headers())  # new names: no look-up for old ones
    if principal is not None:
        route = request.url_rule.rule if request.url_rule is not None else request.path
        response.call_on_close(partial(
            _finished, access().gate, current_app.extensions[METRICS], upstream(), admitted,
            principal, call(), route, response.status_code))
    return response


def _finish_unless_handed_over(error: BaseException | None) -> None:
    admitted: Pass | None = g.pop("access_pass", None)
    if admitted is not None:
        access().gate.finish(admitted, 0, 0)


def _finished(gate: "Gate", metrics: "AccessMetrics | None", served: "Upstream",
              admitted: "Pass | None", principal: "Principal", current: "Call", route: str,
              status: int) -> None:
    from app.access.keys import now
    from app.access.usage import UsageRecord

    latency = perf_counter() - current.started
    prompt, completion = current.prompt_tokens, current.completion_tokens
    if admitted is not None:
        # A prompt the worker did not count (an upstream without usage) is charged, and
        # recorded, as estimated, unless the request failed.
        prompt = prompt or (admitted.estimate if status < 400 else 0)
        gate.finish(admitted, prompt, completion)
    ttft = current.first_token_at - current.started if current.first_token_at else None
    gate.record(UsageRecord(
        created_at=now() - timedelta(seconds=latency), key_id=principal.key_id,
        key_name=principal.name, team=principal.team, model=_known(served, current.model),
        route=route, status=status, prompt_tokens=prompt, completion_tokens=completion,
        latency_ms=latency * 1000, ttft_ms=ttft * 1000 if ttft is not None else None,
        request_id=current.request_id))
    if metrics is not None:
        metrics.used(principal.name, prompt, completion)


def _known(served: "Upstream", model: str) -> str | None:
    """Only names the gateway serves are recorded: a client's made-up model name does not
    become a row of every report."""
    return model if model and (served.controller.knows(model)
                               or served.openai.serves(model)) else None

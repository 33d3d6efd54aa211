"""The gate a model request passes: whose key it is, whether its limits and budget let it
in (and on what terms, for the ``x-ratelimit-*`` headers), and, when it ends, what it used.

Semantics as OpenAI's: a request counts toward rpm when it is admitted; toward tpm with an
estimate of its prompt (a quarter of its body's bytes) when it is admitted, corrected to
the prompt and completion tokens the worker counted when it ends (a stream that the client
left is charged what was generated). A budget is checked when a request is admitted and
charged when it ends, so the request that crosses it finishes and the next is refused.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Protocol

from app.access.budgets import Budgets
from app.access.directory import KeyDirectory, Principal
from app.access.limits import ALLOWED, Limiter, Verdict
from app.access.usage import UsageLedger, UsageRecord
from app.errors import QuotaExceeded, RateLimitExceeded

BYTES_PER_TOKEN = 4  # OpenAI's rule of thumb for English text


class GateObserver(Protocol):
    """Hears of every refusal (the gateway's metrics)."""

    def refused(self, reason: str) -> None: ...


@dataclass(slots=True)  # one per request: slots, not frozen, for a cheap __init__
class Pass:
    """An admitted request's terms, until it ends."""

    principal: Principal
    estimate: int  # prompt tokens counted toward tpm at admission
    lease: str | None  # its parallel slot, if the key limits parallel requests
    verdict: Verdict

    def headers(self) -> list[tuple[str, str]]:
        return rate_limit_headers(self.verdict)


class Gate:
    def __init__(self, directory: KeyDirectory, limiter: Limiter, budgets: Budgets,
                 ledger: UsageLedger | None, observer: GateObserver | None = None) -> None:
        self.directory = directory
        self.limiter = limiter
        self._budgets = budgets
        self.ledger = ledger
        self._observer = observer

    def authenticate(self, token: str) -> Principal:
        return self.directory.authenticate(token)

    def admit(self, principal: Principal, body_bytes: int) -> Pass:
        """Raises QuotaExceeded or RateLimitExceeded (with Retry-After and the
        x-ratelimit-* headers) when the key may not send this request now."""
        key_id = principal.key_id
        if key_id is None:
            return Pass(principal, 0, None, ALLOWED)
        if principal.budget_tokens is not None \
                and self._budgets.spent(key_id) >= principal.budget_tokens:
            self._refused("budget")
            raise QuotaExceeded(
                f"The key '{principal.name}' has used its budget of "
                f"{principal.budget_tokens} tokens for this {principal.budget_period} "
                "(UTC); ask its owner to raise it, or wait for the next "
                f"{principal.budget_period}.", headers={"x-should-retry": "false"})
        limits = principal.limits
        if not limits:
            return Pass(principal, 0, None, ALLOWED)
        estimate = math.ceil(body_bytes / BYTES_PER_TOKEN) if limits.tpm else 0
        lease = secrets.token_hex(8) if limits.max_parallel else None
        verdict = self.limiter.admit(key_id, limits, estimate, lease or "")
        if not verdict.allowed:
            self._refused(verdict.reason or "requests")
            raise RateLimitExceeded(_refusal(principal, verdict, estimate),
                                    "tokens" if verdict.reason == "tokens" else "requests",
                                    headers=_retry_headers(verdict))
        return Pass(principal, estimate, lease, verdict)

    def finish(self, admitted: Pass, prompt_tokens: int, completion_tokens: int) -> None:
        """The request ended: its tokens replace the estimate, its slot is given back and
        its budget charged."""
        principal = admitted.principal
        key_id = principal.key_id
        if key_id is None:
            return
        if principal.limits and (principal.limits.tpm or admitted.lease is not None):
            self.limiter.settle(key_id, principal.limits,
                                prompt_tokens - admitted.estimate + completion_tokens,
                                admitted.lease)
        if principal.budget_tokens is not None:
            self._budgets.charge(key_id, prompt_tokens + completion_tokens)

    def record(self, record: UsageRecord) -> None:
        if self.ledger is not None:
            self.ledger.add(record)

    def _refused(self, reason: str) -> None:
        if self._observer is not None:
            self._observer.refused(reason)


def rate_limit_headers(verdict: Verdict) -> list[tuple[str, str]]:
    """OpenAI's x-ratelimit-{limit,remaining,reset}-{requests,tokens}."""
    headers: list[tuple[str, str]] = []
    requests, tokens = verdict.requests, verdict.tokens
    if requests is not None:
        headers += (("x-ratelimit-limit-requests", str(requests.limit)),
                    ("x-ratelimit-remaining-requests", str(requests.remaining)),
                    ("x-ratelimit-reset-requests", duration(requests.reset)))
    if tokens is not None:
        headers += (("x-ratelimit-limit-tokens", str(tokens.limit)),
                    ("x-ratelimit-remaining-tokens", str(tokens.remaining)),
                    ("x-ratelimit-reset-tokens", duration(tokens.reset)))
    return headers


def _retry_headers(verdict: Verdict) -> dict[str, str]:
    wait = max(verdict.retry_after, 0.001)
    return {**dict(rate_limit_headers(verdict)), "Retry-After": str(math.ceil(wait)),
            "retry-after-ms": str(math.ceil(wait * 1000))}


def duration(seconds: float) -> str:
    """As OpenAI writes a reset time: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def _refusal(principal: Principal, verdict: Verdict, estimate: int) -> str:
    limits = principal.limits
    wait = f"Please try again in {duration(max(verdict.retry_after, 0.001))}."
    if verdict.reason == "tokens":
        window = verdict.tokens
        used = (window.limit - window.remaining) if window is not None else 0
        return (f"Rate limit reached for key '{principal.name}' on tokens per min (TPM): "
                f"Limit {limits.tpm}, Used {used}, Requested {estimate}. {wait}")
    if verdict.reason == "parallel":
        return (f"Rate limit reached for key '{principal.name}' on parallel requests: "
                f"Limit {limits.max_parallel}; one must finish first. {wait}")
    return (f"Rate limit reached for key '{principal.name}' on requests per min (RPM): "
            f"Limit {limits.rpm}. {wait}")

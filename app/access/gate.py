"""The gate a model request passes: whose key it is, whether its limits and budget let it
in (and on what terms: what it holds, the reply's cap, the ``x-ratelimit-*`` headers), and,
when it ends, what it used.

A request is admitted once its body is read: it reserves its worst case (its prompt,
estimated from the bytes read, plus ``max_tokens × n``; see ``app.access.reservations``)
and is settled to what it used when it ends, so the request that would cross a budget or
a minute's tokens is refused before any model work, with OpenAI's 429s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from app.access.budgets import Budgets
from app.access.directory import KeyDirectory, Principal
from app.access.limits import ALLOWED, Limiter, Verdict
from app.access.reservations import Ask, completion_room
from app.access.usage import UsageLedger, UsageRecord
from app.errors import QuotaExceeded, RateLimitExceeded


class GateObserver(Protocol):
    """Hears of every refusal (the gateway's metrics)."""

    def refused(self, reason: str) -> None: ...


@dataclass(slots=True)  # one per request: slots, not frozen, for a cheap __init__
class Pass:
    """An admitted request's terms, until it ends."""

    principal: Principal
    ask: Ask
    verdict: Verdict

    @property
    def cap(self) -> int | None:
        """Max tokens per choice its budget allows; sent to the model."""
        return self.verdict.cap

    def headers(self) -> list[tuple[str, str]]:
        return rate_limit_headers(self.verdict)

    def completion_ceiling(self) -> int:
        """The most completion tokens it may have made: what is charged when an upstream
        that could not say was cut off (its max_tokens, its budget's cap, else what the
        model's context leaves), for every choice."""
        per_choice = self.ask.completion if self.ask.completion is not None else \
            self.verdict.cap if self.verdict.cap is not None else completion_room(self.ask)
        return per_choice * self.ask.choices


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

    def admit(self, principal: Principal, ask: Ask) -> Pass:
        """Raises QuotaExceeded or RateLimitExceeded (with the x-ratelimit-* headers, and
        Retry-After when waiting helps) when the key may not send this request now."""
        key_id = principal.key_id
        limits = principal.limits
        if key_id is None or not limits:
            return Pass(principal, ask, ALLOWED)
        spent = self._budgets.spent(key_id) if limits.budget else 0
        verdict = self.limiter.admit(key_id, limits, ask, spent)
        if not verdict.allowed:
            self._refused(verdict.reason or "requests")
            raise _refusal(principal, ask, verdict)
        return Pass(principal, ask, verdict)

    def finish(self, admitted: Pass, prompt_tokens: int, completion_tokens: int) -> None:
        """The request ended: its reservation is settled to what it used, its slots are
        given back and its budget charged."""
        principal = admitted.principal
        key_id = principal.key_id
        if key_id is None:
            return
        used = prompt_tokens + completion_tokens
        reservation = admitted.verdict.reservation
        if reservation.counted or reservation.slots or reservation.budget:
            self.limiter.settle(key_id, reservation, used)
        if principal.limits.budget:
            self._budgets.charge(key_id, used)

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
    headers = dict(rate_limit_headers(verdict))
    if verdict.never:  # waiting will not help: the official clients then do not retry
        return {**headers, "x-should-retry": "false"}
    wait = max(verdict.retry_after, 0.001)
    return {**headers, "Retry-After": str(math.ceil(wait)),
            "retry-after-ms": str(math.ceil(wait * 1000))}


def duration(seconds: float) -> str:
    """As OpenAI writes a reset time: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def _refusal(principal: Principal, ask: Ask,
             verdict: Verdict) -> QuotaExceeded | RateLimitExceeded:
    limits = principal.limits
    name = principal.name
    # Without Redis, each of several processes enforces its share: the message says so.
    share = f" (this process's share: {verdict.processes} processes count apart)" \
        if verdict.processes > 1 else ""
    if verdict.reason == "budget":
        period = f"{limits.period or 'day'} (UTC)"
        if verdict.spent_out:
            return QuotaExceeded(
                f"The key '{name}' has {verdict.left} of its budget of {limits.budget} "
                f"tokens for this {period} left{share}, and this request needs at least "
                f"{verdict.asked} (its prompt, about {ask.prompt} tokens, and max_tokens × "
                "n, or a token per choice): lower max_tokens or n, ask the key's owner to "
                "raise the budget, or wait for the next period.",
                headers={"x-should-retry": "false"})
        return QuotaExceeded(
            f"The key '{name}' has {verdict.left} of its budget of {limits.budget} tokens "
            f"for this {period} left{share} once its requests in flight end, and this "
            f"request needs at least {verdict.asked}. Please try again when they have "
            "ended.", headers={"Retry-After": "1", "retry-after-ms": "1000"})
    wait = f"Please try again in {duration(max(verdict.retry_after, 0.001))}."
    if verdict.reason == "tokens":
        window = verdict.tokens
        used = (window.limit - window.remaining) if window is not None else 0
        if verdict.never:
            wait = ("It can never fit: lower max_tokens or n, or shorten the prompt "
                    "(a request without max_tokens counts as its prompt plus an estimate "
                    "per choice).")
        return RateLimitExceeded(
            f"Rate limit reached for key '{name}' on tokens per min (TPM): Limit "
            f"{verdict.limit}{share}, Used {used}, Requested {verdict.asked}. {wait}",
            "tokens", headers=_retry_headers(verdict))
    if verdict.reason == "parallel":
        if verdict.never:
            return RateLimitExceeded(
                f"This request asks for {verdict.asked} generations at once (n), more than "
                f"the key '{name}' may run in parallel ({verdict.limit}{share}).",
                "requests", headers=_retry_headers(verdict))
        return RateLimitExceeded(
            f"Rate limit reached for key '{name}' on parallel requests: Limit "
            f"{verdict.limit}{share}, Requested {verdict.asked}; one must finish first. "
            f"{wait}", "requests", headers=_retry_headers(verdict))
    return RateLimitExceeded(f"Rate limit reached for key '{name}' on requests per min "
                             f"(RPM): Limit {verdict.limit}{share}. {wait}", "requests",
                             headers=_retry_headers(verdict))

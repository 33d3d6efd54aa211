"""API keys in the database: made, listed, changed and revoked (the CLI's and the admin
API's one implementation).

A key's secret is ``fc-`` and 43 characters of ``secrets.token_urlsafe(32)`` (256 random
bits). It is shown once, when it is made; the database keeps its SHA-256 (a slow hash adds
nothing to a secret that random) and a hint of its last four characters.

Besides its limits, a key has a share of the model servers when they are busy: a fair-share
``weight`` (its team's is the highest of the team's active keys) and service tiers, the
highest it may use (``max_tier``) and the one a request that names none gets
(``default_tier``; unset: ``app.scheduling.tiers.default_tier_for(max_tier)``).
"""
from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Mapping

from sqlalchemy import Engine, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from app.access.tables import api_keys
from app.errors import Conflict, InvalidRequest, ObjectNotFound
from app.scheduling.tiers import RANK, TIERS, default_tier_for

SECRET_PREFIX = "fc-"
PERIODS = ("day", "month")
# Weights are ratios: 1000 to 1 is more than any two teams need, and a bound keeps a typo
# (an extra zero or three) from starving everyone else.
MAX_WEIGHT = 1000.0
# A default tier given as this (the CLI's and the API's word, as OpenAI's service_tier)
# is unset: the key's max tier decides it.
AUTO_TIER = "auto"


class KeyStoreError(InvalidRequest):
    """A key operation that cannot be done; the message says why (a 400 for the admin
    API, a message and exit status 2 for the CLI)."""


class KeyNotFound(KeyStoreError, ObjectNotFound):
    pass


class KeyConflict(KeyStoreError, Conflict):
    pass


def now() -> datetime:
    """UTC, naive (as the database stores it)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    team: str | None
    hint: str
    models: tuple[str, ...] | None  # None: every model
    rpm: int | None
    tpm: int | None
    max_parallel: int | None
    budget_tokens: int | None
    budget_period: str | None
    weight: float
    max_tier: str
    default_tier: str | None  # None: see effective_default_tier()
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime
    updated_at: datetime

    def status(self, at: datetime | None = None) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (at or now()):
            return "expired"
        return "active"

    def effective_default_tier(self) -> str:
        """The tier a request that asks for none gets."""
        return self.default_tier or default_tier_for(self.max_tier)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = _iso(value) if isinstance(value, datetime) else \
                list(value) if isinstance(value, tuple) else value
        out["status"] = self.status()
        return out

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> "ApiKey":
        models = json.loads(row["models"]) if row["models"] else None
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name != "models"},
                   models=tuple(models) if models is not None else None)


_CHANGEABLE = ("team", "models", "rpm", "tpm", "max_parallel", "budget_tokens",
               "budget_period", "weight", "max_tier", "default_tier", "expires_at")


class KeyStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, name: str, expires_in: timedelta | None = None,
               **limits: Any) -> tuple[ApiKey, str]:
        """The new key and its secret (shown once). A name already taken, even at the same
        moment by another host, is a KeyConflict."""
        _check_budget(limits.get("budget_tokens"), limits.get("budget_period"))
        limits = {"weight": 1.0, "max_tier": "default", "default_tier": None, **limits}
        limits.update(_checked_share(limits["weight"], limits["max_tier"],
                                     limits["default_tier"]))
        secret = new_secret()
        made = now()
        key_id = "key_" + secrets.token_hex(8)
        values: dict[str, Any] = {
            "id": key_id, "name": name, "secret_hash": secret_hash(secret),
            "hint": f"{SECRET_PREFIX}...{secret[-4:]}", "created_at": made, "updated_at": made,
            "expires_at": made + expires_in if expires_in is not None else None}
        values.update(_column_values(limits))
        try:
            with self.engine.begin() as connection:
                connection.execute(insert(api_keys).values(**values))
        except IntegrityError:
            raise KeyConflict(f"A key named {name!r} exists already.", "name") from None
        return self.get(key_id), secret

    def list(self) -> list[ApiKey]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(api_keys).order_by(api_keys.c.created_at))
            return [ApiKey.from_row(row._mapping) for row in rows]

    def get(self, ref: str) -> ApiKey:
        """By id or by name."""
        with self.engine.connect() as connection:
            row = connection.execute(select(api_keys).where(
                or_(api_keys.c.id == ref, api_keys.c.name == ref))).first()
        if row is None:
            raise KeyNotFound(f"No API key {ref!r}.")
        return ApiKey.from_row(row._mapping)

    def update(self, ref: str, expires_in: timedelta | None = None,
               **changes: Any) -> ApiKey:
        key = self.get(ref)
        unknown = set(changes) - set(_CHANGEABLE)
        if unknown:
            raise KeyStoreError(f"cannot change {', '.join(sorted(unknown))}")
        values = _column_values(changes)
        if expires_in is not None:
            values["expires_at"] = now() + expires_in
        _check_budget(values.get("budget_tokens", key.budget_tokens),
                      values.get("budget_period", key.budget_period))
        if {"weight", "max_tier", "default_tier"} & set(values):
            # Checked with what is kept: a max tier lowered below the stored default tier
            # is refused, not a key whose default it may not use.
            share = _checked_share(values.get("weight", key.weight),
                                   values.get("max_tier", key.max_tier),
                                   values.get("default_tier", key.default_tier))
            values.update({name: share[name] for name in share if name in values})
        return self._set(key.id, values)

    def revoke(self, ref: str) -> ApiKey:
        key = self.get(ref)
        if key.revoked_at is not None:
            return key
        return self._set(key.id, {"revoked_at": now()})

    def _set(self, key_id: str, values: dict[str, Any]) -> ApiKey:
        with self.engine.begin() as connection:
            connection.execute(update(api_keys).where(api_keys.c.id == key_id)
                               .values(**values, updated_at=now()))
        return self.get(key_id)

    # ---- for the gateway's key directory -------------------------------------------------

    def by_hash(self) -> dict[str, ApiKey]:
        """Every key by its secret's hash."""
        with self.engine.connect() as connection:
            rows = connection.execute(select(api_keys))
            return {row.secret_hash: ApiKey.from_row(row._mapping) for row in rows}

    def changed_since(self, since: datetime) -> dict[str, ApiKey]:
        """The keys made or changed at or after ``since``, by their secret's hash."""
        with self.engine.connect() as connection:
            rows = connection.execute(select(api_keys).where(api_keys.c.updated_at >= since))
            return {row.secret_hash: ApiKey.from_row(row._mapping) for row in rows}

    def find(self, hash_: str) -> ApiKey | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(api_keys).where(
                api_keys.c.secret_hash == hash_)).first()
        return ApiKey.from_row(row._mapping) if row is not None else None

    def count(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(api_keys))
                       .scalar_one())


def _column_values(values: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(values)
    if "models" in out:
        models: Iterable[str] | None = out["models"]
        out["models"] = json.dumps(sorted(set(models))) if models else None
    return out


def _check_budget(tokens: int | None, period: str | None) -> None:
    if (tokens is None) != (period is None):
        raise KeyStoreError("a budget needs both --budget TOKENS and --budget-period day|month")
    if period is not None and period not in PERIODS:
        raise KeyStoreError(f"budget period must be day or month, not {period!r}")


def _checked_share(weight: Any, max_tier: Any, default_tier: Any) -> dict[str, Any]:
    """The weight and tiers as stored (``auto`` is an unset default tier), or a
    KeyStoreError naming the field that is wrong."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
            or not 0 < weight <= MAX_WEIGHT:  # NaN fails this too
        raise KeyStoreError(f"weight must be a number above 0 and at most "
                            f"{MAX_WEIGHT:g}, not {weight!r}", "weight")
    choices = ", ".join(TIERS)
    if max_tier not in RANK:
        raise KeyStoreError(f"max_tier must be one of {choices}, not {max_tier!r}",
                            "max_tier")
    if default_tier == AUTO_TIER:
        default_tier = None
    if default_tier is not None and default_tier not in RANK:
        raise KeyStoreError(f"default_tier must be one of {choices} or {AUTO_TIER}, not "
                            f"{default_tier!r}", "default_tier")
    if default_tier is not None and RANK[default_tier] < RANK[max_tier]:
        raise KeyStoreError(f"default_tier {default_tier!r} is above max_tier {max_tier!r}: "
                            f"a key's default tier must be one it may use (set both, or "
                            f"the default tier to {AUTO_TIER})", "default_tier")
    return {"weight": float(weight), "max_tier": max_tier, "default_tier": default_tier}


def _iso(value: datetime) -> str:
    return value.replace(tzinfo=timezone.utc).isoformat(timespec="seconds")

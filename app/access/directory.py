"""Who a request's API key belongs to, as this process knows it.

Every key (by its secret's SHA-256) is loaded at start; every ``refresh`` seconds a
background thread reads the keys changed lately (and all of them once a minute), with
what each budgeted key spent: a key revoked, expired or changed anywhere takes effect here
within one refresh, and a request reads no database in steady state. A key seen for the
first time between two refreshes (made a moment ago) is looked up once. While the database
cannot be reached, the keys already known keep working; an unknown key is refused with a
503, never let in.

Keys from ``--api-keys`` / ``--api-keys-file`` (FastChat's) are unlimited and compared in
constant time; each owns what it stores under an id derived from it (never the key
itself). With none of those and no key in the database, auth is off (as ``flaskchat up``
starts): all traffic is one anonymous owner, and a warning says so at start and every few
minutes; the first key made turns auth on. With ``require_auth`` it never is off: without
a key every model request is refused.

A principal also says whom its request counts against when the model servers are shared
out (its tenant: the key's team, else the key) and with what weight (a team's is the
highest of its active keys', worked out whenever the keys are read, not per request).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Iterable

from app.access.budgets import Budgets, read_spent
from app.access.keys import ApiKey, KeyStore, now, secret_hash
from app.access.limits import KeyLimits
from app.errors import AuthenticationFailed, UpstreamUnavailable
from app.scheduling.tiers import default_tier_for

log = logging.getLogger("flaskchat.keys")
UNKNOWN_TTL = 2.0  # a secret found nowhere is not looked up again for this long
MAX_UNKNOWN = 10_000
FULL_RELOAD = 60.0  # seconds between reads of every key
# A refresh reads the keys changed since the newest change it has seen, less this margin:
# the timestamps come from the clocks of the hosts that wrote them, which may disagree.
CLOCK_MARGIN = timedelta(seconds=30)
AUTH_OFF_WARNING_EVERY = 300.0  # seconds between warnings while auth is off
UNKEYED_TIER = "default"  # the highest and default tier of --api-keys keys and auth off


@dataclass(frozen=True)
class Principal:
    """Who a request is from, and what it may do."""

    key_id: str | None  # None: no key, or a --api-keys key
    name: str | None
    team: str | None
    models: frozenset[str] | None  # None: every model
    limits: KeyLimits
    # Who owns what the request stores (stored responses): the key's id; for a
    # --api-keys key an id derived from it; "" for the one anonymous owner (auth off).
    owner: str
    # Whom the request counts against when the model servers are shared out: the key's
    # team, else the key's id; a --api-keys key's owner id; "anonymous" with auth off.
    tenant: str
    weight: float  # the tenant's fair-share weight (a team's: the most of its active keys')
    max_tier: str  # the highest service tier the key may use (app.scheduling.tiers)
    default_tier: str  # the tier of a request that names none (never unset)

    @classmethod
    def of(cls, key: ApiKey, weight: float) -> "Principal":
        """``weight``: the tenant's, which for a team the directory works out."""
        return cls(key.id, key.name, key.team,
                   frozenset(key.models) if key.models is not None else None,
                   KeyLimits(key.rpm, key.tpm, key.max_parallel, key.budget_tokens,
                             key.budget_period), key.id, key.team or key.id, weight,
                   key.max_tier, key.effective_default_tier())


ANONYMOUS = Principal(None, None, None, None, KeyLimits(), "", "anonymous", 1.0,
                      UNKEYED_TIER, default_tier_for(UNKEYED_TIER))  # auth is off


OWNER_ROUNDS = 50_000  # PBKDF2 rounds: an owner id stored in the database is slow to guess


def flag_key_principal(secret: str) -> Principal:
    """A --api-keys key: unlimited, named "api-keys", its own owner: a slow hash of the
    key (PBKDF2, made once per process), stable across restarts and hosts, from which
    someone who reads the database cannot cheaply try guesses of an operator's key."""
    owner = "flag_" + hashlib.pbkdf2_hmac("sha256", secret.encode(), b"flaskchat-owner",
                                          OWNER_ROUNDS).hex()[:32]
    return Principal(None, "api-keys", None, None, KeyLimits(), owner, owner, 1.0,
                     UNKEYED_TIER, default_tier_for(UNKEYED_TIER))


class KeyDirectory:
    def __init__(self, store: KeyStore | None, static_keys: tuple[str, ...],
                 refresh: float, budgets: Budgets, require_auth: bool = False,
                 where: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        """``where``: the key database as the auth-off warning names it."""
        self._store = store
        self._static = tuple(key.encode() for key in static_keys)
        self._static_principals = tuple(flag_key_principal(key) for key in static_keys)
        self._require_auth = require_auth
        self._where = where
        self._warned_at = float("-inf")
        self._refresh = refresh
        self._budgets = budgets
        self._clock = clock
        self._keys: dict[str, ApiKey] = {}  # by secret hash
        self._by_id: dict[str, ApiKey] = {}
        self._principals: dict[str, Principal] = {}  # by secret hash, made once per key
        self._team_weights: dict[str, float] = {}  # the most of each team's active keys'
        self._unknown: dict[str, float] = {}  # hash -> when it was found nowhere
        self._failing = False
        self._read_at: datetime | None = None  # when the last successful read began
        self._full_at = float("-inf")  # when every key was last read

    @property
    def auth_on(self) -> bool:
        # Until the keys could be read once, nobody can know that there are none.
        return self._require_auth or bool(self._static) or bool(self._keys) or \
            (self._store is not None and self._read_at is None)

    def start(self) -> None:
        """Loads the keys now (a database that cannot be read is logged, not fatal: the
        process serves what it can), then keeps them fresh in the background."""
        if self._store is None:
            self.warn_if_open()
            return
        self.reload()
        self.warn_if_open()
        threading.Thread(target=self._keep_fresh, name="key-directory", daemon=True).start()

    def warn_if_open(self) -> None:
        """While auth is off, a warning at start and every few minutes: a server that
        anyone can use, and charge to nobody, should not go unnoticed (a restored or empty
        database, or another user's SQLite file, turns auth off)."""
        if self.auth_on or self._clock() - self._warned_at < AUTH_OFF_WARNING_EVERY:
            return
        self._warned_at = self._clock()
        log.warning("auth is off: no API key is configured (the key database %s has none, "
                    "and no --api-keys is set), so anyone who can reach this server may use "
                    "every model; make a key with `flaskchat keys create`, or start with "
                    "--require-auth to refuse every request until one exists",
                    self._where or "(none)")

    def authenticate(self, token: str) -> Principal:
        if not self.auth_on:
            if not token or not self._first_key_made(token):
                return ANONYMOUS
        if not token:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it in the Authorization header as "
                "'Authorization: Bearer YOUR_KEY'.")
        if self._static:
            flag = self._flag_key(token.encode())
            if flag is not None:
                return flag
        hashed = secret_hash(token)
        key = self._keys.get(hashed) or self._look_up(hashed)
        if key is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        status = key.status()
        if status != "active":
            raise AuthenticationFailed(f"This API key has been {status}; ask for a new one.")
        principal = self._principals.get(hashed)
        if principal is None or principal.key_id != key.id:
            principal = self._principals[hashed] = Principal.of(key, self.weight_of(key))
        return principal

    def principal(self, key_id: str | None, owner: str) -> Principal | None:
        """The principal of a key by its id (a --api-keys key by its owner id), if it is
        still active (demo tickets)."""
        if key_id is None:
            if not owner:
                return None if self.auth_on else ANONYMOUS
            return next((p for p in self._static_principals if p.owner == owner), None)
        key = self._by_id.get(key_id)
        if key is None or key.status() != "active":
            return None
        return Principal.of(key, self.weight_of(key))

    def weight_of(self, key: ApiKey) -> float:
        """The fair-share weight of the key's tenant: its team's, else its own."""
        if key.team is None:
            return key.weight
        return self._team_weights.get(key.team, key.weight)

    def reload(self) -> bool:
        """Reads the keys changed lately (every key, once a minute) and the budgets."""
        if self._store is None:
            return True
        store = self._store
        full = self._read_at is None or self._clock() - self._full_at >= FULL_RELOAD
        read_at = now()
        mark = self._budgets.mark()
        try:
            if full:
                keys = store.by_hash()
            else:
                # Changed since the last read began, less a margin for hosts' clocks and
                # slow commits (a bulk of new keys is read again only for that long).
                assert self._read_at is not None
                keys = {**self._keys, **store.changed_since(self._read_at - CLOCK_MARGIN)}
            budgeted = [(k.id, k.budget_period) for k in keys.values()
                        if k.budget_tokens and k.budget_period]
            spent = read_spent(store.engine, budgeted, now()) if budgeted else {}
        except Exception as exc:  # the database's failures, whatever their kind
            if not self._failing:
                log.error("cannot read the API keys (the %d known keep working): %s",
                          len(self._keys), " ".join(str(exc).split())[:300])
            self._failing = True
            return False
        if self._failing:
            log.warning("the API keys can be read again (%d keys)", len(keys))
            self._failing = False
        if full:
            self._full_at = self._clock()
        team_weights = _team_weights(keys.values())
        if keys != self._keys or team_weights != self._team_weights:
            self._principals = {}  # a key or its team's weight changed (or expired)
        self._keys = keys
        self._by_id = {key.id: key for key in keys.values()}
        self._team_weights = team_weights
        self._read_at = read_at
        self._budgets.reload(spent, mark)
        return True

    def _keep_fresh(self) -> None:
        while True:
            time.sleep(self._refresh)
            self.reload()
            self.warn_if_open()

    def _flag_key(self, candidate: bytes) -> Principal | None:
        # Compare against every key so the time does not tell which one (or how many).
        found = None
        for key, principal in zip(self._static, self._static_principals):
            if hmac.compare_digest(candidate, key):
                found = principal
        return found

    def _first_key_made(self, token: str) -> bool:
        """Auth is off, but the token may be the first key, made since the last refresh:
        then auth is on from this request (its owner would not expect it to go
        uncounted). A database that cannot say leaves auth off until it can."""
        try:
            return self._look_up(secret_hash(token)) is not None
        except UpstreamUnavailable:
            return False

    def _look_up(self, hashed: str) -> ApiKey | None:
        """A key made since the last refresh; the database says, once."""
        if self._store is None:
            return None
        seen = self._unknown.get(hashed)
        if seen is not None and self._clock() - seen < UNKNOWN_TTL:
            return None
        try:
            key = self._store.find(hashed)
        except Exception:  # the database cannot say: refuse, never let in
            raise UpstreamUnavailable("This API key cannot be checked right now (the key "
                                      "database is unreachable); retry shortly.",
                                      headers={"Retry-After": "2"}) from None
        if key is None:
            if len(self._unknown) >= MAX_UNKNOWN:
                self._unknown.clear()
            self._unknown[hashed] = self._clock()
            return None
        self._keys[hashed] = key
        self._by_id[key.id] = key
        if key.team is not None and key.status() == "active" \
                and key.weight > self._team_weights.get(key.team, 0.0):
            # A heavier key new to its team raises the team's weight now, for the team's
            # other keys too, not at the next refresh.
            self._team_weights[key.team] = key.weight
            self._principals = {}
        return key


def _team_weights(keys: Iterable[ApiKey]) -> dict[str, float]:
    """Each team's weight: the most of its active keys' (a team whose keys are all revoked
    or expired has none; it makes no requests)."""
    at = now()
    weights: dict[str, float] = {}
    for key in keys:
        if key.team is not None and key.status(at) == "active":
            weights[key.team] = max(weights.get(key.team, 0.0), key.weight)
    return weights

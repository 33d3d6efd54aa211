"""``flaskchat keys ...``, ``flaskchat usage`` and ``flaskchat db ...``: what a team lead
types. Each prints a table for people or, with ``--json``, JSON for scripts; a refusal is
a message on stderr and exit status 2."""
from __future__ import annotations

import json
import sys
from datetime import timedelta
from typing import Any, Callable, Sequence

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from app.access import database
from app.access.keys import ApiKey, KeyStore, KeyStoreError
from app.access.reports import parse_since, usage_report


def prepared_engine(url: str) -> Engine:
    """An engine for a database at the newest schema (an SQLite file is brought there)."""
    database.check(url)
    return database.engine_for(url)


def run(action: Callable[[], int]) -> int:
    try:
        return action()
    except (KeyStoreError, database.DatabaseError, ValueError) as exc:
        print(f"flaskchat: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        print(f"flaskchat: the database failed: {database.reason(exc)}", file=sys.stderr)
        return 2


# ---- keys ---------------------------------------------------------------------------------

def create_key(url: str, name: str, expires_in: timedelta | None, as_json: bool,
               **limits: Any) -> int:
    key, secret = KeyStore(prepared_engine(url)).create(name, expires_in, **limits)
    if as_json:
        print(json.dumps({**key.as_json(), "secret": secret}, indent=2))
        return 0
    team = f" for team {key.team!r}" if key.team else ""
    print(f"Created the key {key.name!r} ({key.id}){team}. Its secret, shown only now "
          "(only a hash of it is kept):\n")
    print(f"    {secret}\n")
    print(f"Limits: {_limits(key)}")
    print(f"Share:  {_share(key)}")
    print("Use it:  export OPENAI_API_KEY=<the secret>  (and OPENAI_BASE_URL=http://HOST:PORT"
          "/v1)")
    return 0


def list_keys(url: str, as_json: bool) -> int:
    keys = KeyStore(prepared_engine(url)).list()
    if as_json:
        print(json.dumps([key.as_json() for key in keys], indent=2))
        return 0
    rows = [[key.id, key.name, key.team or "-", key.status(), _models(key), _limits(key),
             _share(key), _date(key.expires_at), key.hint] for key in keys]
    _table(["ID", "NAME", "TEAM", "STATUS", "MODELS", "LIMITS", "SHARE", "EXPIRES",
            "SECRET"], rows)
    return 0


def show_key(url: str, ref: str, as_json: bool) -> int:
    key = KeyStore(prepared_engine(url)).get(ref)
    _print_key(key, as_json)
    return 0


def update_key(url: str, ref: str, expires_in: timedelta | None, as_json: bool,
               **changes: Any) -> int:
    if not changes and expires_in is None:
        raise ValueError("nothing to change: give --team, --models, --rpm, --tpm, "
                         "--max-parallel, --budget/--budget-period, --weight, --max-tier, "
                         "--default-tier or --expires")
    key = KeyStore(prepared_engine(url)).update(ref, expires_in, **changes)
    _print_key(key, as_json)
    return 0


def revoke_key(url: str, ref: str, as_json: bool) -> int:
    key = KeyStore(prepared_engine(url)).revoke(ref)
    if as_json:
        print(json.dumps(key.as_json(), indent=2))
    else:
        print(f"Revoked the key {key.name!r} ({key.id}); every gateway refuses it within "
              "seconds.")
    return 0


def _print_key(key: ApiKey, as_json: bool) -> None:
    if as_json:
        print(json.dumps(key.as_json(), indent=2))
        return
    for label, value in (("id", key.id), ("name", key.name), ("team", key.team or "-"),
                         ("status", key.status()), ("models", _models(key)),
                         ("limits", _limits(key)), ("share", _share(key)),
                         ("expires", _date(key.expires_at)),
                         ("created", _date(key.created_at)), ("secret", key.hint)):
        print(f"{label + ':':9} {value}")


def _models(key: ApiKey) -> str:
    return ",".join(key.models) if key.models is not None else "all"


def _limits(key: ApiKey) -> str:
    parts = [f"{key.rpm} rpm" if key.rpm else "", f"{key.tpm} tpm" if key.tpm else "",
             f"{key.max_parallel} parallel" if key.max_parallel else "",
             f"{key.budget_tokens} tokens/{key.budget_period}" if key.budget_tokens else ""]
    return ", ".join(part for part in parts if part) or "none"


def _share(key: ApiKey) -> str:
    """``weight 2, tiers up to priority, default flex`` (an unset one: ``auto (flex)``)."""
    tier = key.effective_default_tier()
    default = tier if key.default_tier is not None else f"auto ({tier})"
    return f"weight {key.weight:g}, tiers up to {key.max_tier}, default {default}"


def _date(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M") + " UTC" if value is not None else "-"


# ---- usage --------------------------------------------------------------------------------

def show_usage(url: str, group_by: str, since_text: str, as_json: bool,
               retention: float) -> int:
    since = parse_since(since_text)
    rows, more = usage_report(prepared_engine(url), group_by, since, retention)
    if as_json:
        print(json.dumps({"group_by": group_by, "since": since.isoformat() + "Z",
                          "data": rows, "has_more": more}, indent=2))
        return 0
    print(f"Usage since {since:%Y-%m-%d %H:%M} UTC, by {group_by}:")
    label = {"key": "KEY", "team": "TEAM", "model": "MODEL", "day": "DAY"}[group_by]
    table = [[str(row.get(group_by) or "-"), row["requests"], row["errors"],
              row["prompt_tokens"], row["completion_tokens"], row["total_tokens"],
              row["mean_latency_ms"]] for row in rows]
    total = [sum(row[i] for row in table) for i in range(1, 6)]
    _table([label, "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "TOTAL TOKENS",
            "MEAN MS"], table + ([["(total)", *total, ""]] if len(table) > 1 else []))
    if more:
        print(f"(only the {len(rows)} biggest; narrow --since or group otherwise)")
    return 0


# ---- db -----------------------------------------------------------------------------------

def upgrade_db(url: str) -> int:
    database.upgrade(url)
    print(f"flaskchat: the database is at schema revision {database.HEAD}")
    return 0


def check_db(url: str) -> int:
    """Reachable and current (an SQLite file is brought there): what ``flaskchat serve``
    checks before it starts its processes."""
    database.check(url)
    return 0


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [list(header)] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if not rows:
        print("(none)")

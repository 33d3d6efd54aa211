"""The database tables (SQLAlchemy Core): API keys, one usage row per request (kept for
``--usage-retention``), usage summed per day, key and model (kept for good: what budgets,
reports and the admin chart read), the Responses API's stored responses, and which
releases can run on this schema."""
from __future__ import annotations

from sqlalchemy import (BigInteger, Column, DateTime, Float, Index, Integer, MetaData, String,
                        Table, Text)

metadata = MetaData()

api_keys = Table(
    "api_keys", metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("team", String(200)),
    # SHA-256 of the secret: the secret itself is shown once and stored nowhere.
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("hint", String(16), nullable=False),  # "fc-...ab3d": to recognise a key
    Column("models", Text),  # a JSON list of model names, or NULL for every model
    Column("rpm", Integer),
    Column("tpm", Integer),
    Column("max_parallel", Integer),
    Column("budget_tokens", BigInteger),
    Column("budget_period", String(8)),  # "day" or "month"
    # Since revision 0004 (keys made before it, or by a release before it, read as weight
    # 1, highest tier "default", default tier unset): the key's fair-share weight and
    # service tiers (app.scheduling.tiers).
    Column("weight", Float, nullable=False, server_default="1"),
    Column("max_tier", String(16), nullable=False, server_default="default"),
    Column("default_tier", String(16)),  # NULL: app.scheduling.tiers.default_tier_for
    Column("expires_at", DateTime()),  # naive UTC throughout
    Column("revoked_at", DateTime()),
    Column("created_at", DateTime(), nullable=False),
    Column("updated_at", DateTime(), nullable=False),
)

usage = Table(
    "usage", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("created_at", DateTime(), nullable=False),
    Column("key_id", String(40)),  # NULL: no key (auth off, or a --api-keys key)
    Column("key_name", String(200)),
    Column("team", String(200)),
    Column("model", String(200)),
    Column("route", String(200), nullable=False),
    Column("status", Integer, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float),
    Column("request_id", String(130), nullable=False),
    Index("ix_usage_created_at", "created_at"),
    Index("ix_usage_key_created", "key_id", "created_at"),
)

usage_daily = Table(
    "usage_daily", metadata,
    Column("day", String(10), primary_key=True),  # UTC date, YYYY-MM-DD
    Column("key_id", String(40), primary_key=True),  # "" for requests without a key
    Column("model", String(200), primary_key=True),
    Column("team", String(200)),
    Column("requests", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    # Since revision 0003 (rows written before it count 0 errors and 0 ms).
    Column("errors", BigInteger, nullable=False, server_default="0"),
    Column("latency_ms", Float, nullable=False, server_default="0"),  # summed
    Column("key_name", String(200)),
)

# The Responses API's stored responses (``store: true``), owned by the key that made them.
responses = Table(
    "responses", metadata,
    Column("id", String(64), primary_key=True),  # resp_...
    Column("owner", String(40), nullable=False),  # key id; "" for no key or --api-keys
    Column("model", String(200), nullable=False),
    Column("created_at", DateTime(), nullable=False),
    Column("expires_at", DateTime(), nullable=False),
    Column("input_items", Text, nullable=False),  # JSON: this request's input items
    Column("context", Text, nullable=False),  # JSON: the chat messages a follow-up replays
    Column("response", Text, nullable=False),  # JSON: the response object
    # The three JSON texts' length (since revision 0003): what counts toward the owner's
    # quota.
    Column("bytes", BigInteger, nullable=False, server_default="0"),
    Index("ix_responses_expires_at", "expires_at"),
    Index("ix_responses_created_at", "created_at"),
    Index("ix_responses_owner_created", "owner", "created_at"),
)

# One row per schema revision from 0003 on: the oldest schema revision whose release can
# still run on it (an additive migration: the previous one). A release that finds its
# database at a revision it does not know starts if that revision says so, which is what
# a rolling deploy or a rollback needs (``app.access.database.check``).
schema_releases = Table(
    "flaskchat_schema", metadata,
    Column("revision", String(32), primary_key=True),
    Column("oldest_release", String(32), nullable=False),
)

"""OpenAI's service tiers, as flaskchat serves them: ``priority`` before ``default`` before
``flex``. ``auto`` (and no tier) is the key's default tier."""
from __future__ import annotations

TIERS = ("priority", "default", "flex")  # highest first
RANK = {tier: rank for rank, tier in enumerate(TIERS)}


def default_tier_for(max_tier: str) -> str:
    """A key's default tier when none is set: ``default``, or ``flex`` for a key that may
    use nothing higher (a batch key)."""
    return "flex" if max_tier == "flex" else "default"


def granted_tier(requested: str | None, default: str, highest: str) -> str:
    """The tier a request is served at: what it asked (``auto``/None: the key's default),
    never above the key's highest."""
    wanted = default if requested in (None, "auto") else requested
    if wanted not in RANK:
        wanted = default
    return wanted if RANK[wanted] >= RANK[highest] else highest

"""Usage read back: totals grouped by key, team, model or day (``flaskchat usage``, the
admin API), and tokens per day per team (the admin page's chart)."""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Engine, String, case, func, select

from app.access.keys import now
from app.access.tables import usage, usage_daily

GROUPS = ("key", "team", "model", "day")
_SINCE = re.compile(r"^(\d{1,5})([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, at: datetime | None = None) -> datetime:
    """``7d``, ``24h``, ``30m``, ``2w`` before now, or an ISO date or time (UTC)."""
    at = at or now()
    found = _SINCE.match(text.strip())
    if found:
        return at - timedelta(**{_UNITS[found.group(2)]: int(found.group(1))})
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"since must be like 7d, 24h, 30m, 2w or an ISO date, not "
                         f"{text!r}") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
    return parsed


def usage_report(engine: Engine, group_by: str, since: datetime) -> list[dict[str, Any]]:
    """One row per group since ``since``: requests, errors (status >= 400), tokens, mean
    latency; the biggest users of tokens first (days in order)."""
    if group_by not in GROUPS:
        raise ValueError(f"group_by must be one of {', '.join(GROUPS)}")
    day = func.substr(func.cast(usage.c.created_at, String), 1, 10)
    choices: dict[str, list[Any]] = {
        "key": [usage.c.key_id, func.max(usage.c.key_name)],
        "team": [usage.c.team], "model": [usage.c.model], "day": [day]}
    columns = choices[group_by]
    tokens = func.sum(usage.c.prompt_tokens + usage.c.completion_tokens)
    query = (select(*columns, func.count(), func.sum(case((usage.c.status >= 400, 1),
                                                          else_=0)),
                    func.sum(usage.c.prompt_tokens), func.sum(usage.c.completion_tokens),
                    func.avg(usage.c.latency_ms))
             .where(usage.c.created_at >= since)
             .group_by(*columns[:1])
             .order_by(columns[0] if group_by == "day" else tokens.desc()))
    rows = []
    with engine.connect() as connection:
        for row in connection.execute(query):
            values = list(row)
            group: dict[str, Any]
            if group_by == "key":
                key_id, name = values.pop(0), values.pop(0)
                group = {"key_id": key_id, "key": name if key_id else "(no key)"}
            else:
                group = {group_by: values.pop(0)}
            requests, errors, prompt, completion, latency = values
            prompt, completion = int(prompt or 0), int(completion or 0)
            rows.append({**group, "requests": int(requests), "errors": int(errors or 0),
                         "prompt_tokens": prompt, "completion_tokens": completion,
                         "total_tokens": prompt + completion,
                         "mean_latency_ms": round(float(latency or 0.0), 1)})
    return rows


def tokens_per_team_per_day(engine: Engine, days: int = 30) -> dict[str, Any]:
    """``{"days": [...], "teams": {team: [tokens per day]}}`` for the last ``days`` days,
    today included; requests without a team count under "(no team)"."""
    today = now().date()
    labels = [(today - timedelta(days=back)).isoformat() for back in range(days - 1, -1, -1)]
    position = {day: index for index, day in enumerate(labels)}
    query = (select(usage_daily.c.day, usage_daily.c.team,
                    func.sum(usage_daily.c.prompt_tokens + usage_daily.c.completion_tokens))
             .where(usage_daily.c.day >= labels[0])
             .group_by(usage_daily.c.day, usage_daily.c.team))
    teams: dict[str, list[int]] = {}
    with engine.connect() as connection:
        for day, team, tokens in connection.execute(query):
            if day in position:
                series = teams.setdefault(team or "(no team)", [0] * days)
                series[position[day]] += int(tokens or 0)
    return {"days": labels, "teams": dict(sorted(teams.items()))}

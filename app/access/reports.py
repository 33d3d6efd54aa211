"""Usage read back: totals grouped by key, team, model or day (``flaskchat usage``, the
admin API), and tokens per day per team (the admin page's chart)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Engine, String, case, func, select

from app.access.keys import now
from app.access.retention import cutoff
from app.access.tables import usage, usage_daily
from app.config import parse_duration

GROUPS = ("key", "team", "model", "day")


def parse_since(text: str, at: datetime | None = None) -> datetime:
    """A duration before now (``7d``, ``24h``, ``30m``, ``2w``: the one duration format),
    or an ISO date or time (UTC)."""
    at = at or now()
    try:
        return at - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"since must be like 7d, 24h, 30m, 2w or an ISO date, not "
                         f"{text!r}") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
    return parsed


MAX_ROWS = 1000  # groups a report returns at most (the biggest users first)


def usage_report(engine: Engine, group_by: str, since: datetime,
                 retention: float | None = None,
                 at: datetime | None = None) -> tuple[list[dict[str, Any]], bool]:
    """One row per group since ``since``: requests, errors (status >= 400), tokens, mean
    latency; the biggest users of tokens first (days in order), at most MAX_ROWS of them,
    and whether there were more. Within ``retention`` it reads the rows (one per request);
    before it, the per-day sums, so that part begins at the start of ``since``'s day."""
    if group_by not in GROUPS:
        raise ValueError(f"group_by must be one of {', '.join(GROUPS)}")
    edge = cutoff(at or now(), retention) if retention else None
    groups: dict[Any, dict[str, Any]] = {}
    with engine.connect() as connection:
        _add(groups, group_by, connection.execute(
            _raw_query(group_by, since if edge is None else max(since, edge))))
        if edge is not None and since < edge:
            _add(groups, group_by, connection.execute(
                _daily_query(group_by, since.strftime("%Y-%m-%d"),
                             edge.strftime("%Y-%m-%d"))))
    rows = [_finished_row(row) for row in groups.values()]
    rows.sort(key=(lambda row: row["day"]) if group_by == "day"
              else (lambda row: -row["total_tokens"]))
    return rows[:MAX_ROWS], len(rows) > MAX_ROWS


def _raw_query(group_by: str, since: datetime) -> Any:
    day = func.substr(func.cast(usage.c.created_at, String), 1, 10)
    choices: dict[str, list[Any]] = {
        "key": [usage.c.key_id, func.max(usage.c.key_name)],
        "team": [usage.c.team], "model": [usage.c.model], "day": [day]}
    columns = choices[group_by]
    return (select(*columns, func.count(),
                   func.sum(case((usage.c.status >= 400, 1), else_=0)),
                   func.sum(usage.c.prompt_tokens), func.sum(usage.c.completion_tokens),
                   func.sum(usage.c.latency_ms))
            .where(usage.c.created_at >= since).group_by(columns[0]))


def _daily_query(group_by: str, first_day: str, edge_day: str) -> Any:
    table = usage_daily.c
    choices: dict[str, list[Any]] = {
        "key": [table.key_id, func.max(table.key_name)], "team": [table.team],
        "model": [table.model], "day": [table.day]}
    columns = choices[group_by]
    return (select(*columns, func.sum(table.requests), func.sum(table.errors),
                   func.sum(table.prompt_tokens), func.sum(table.completion_tokens),
                   func.sum(table.latency_ms))
            .where(table.day >= first_day, table.day < edge_day).group_by(columns[0]))


def _add(groups: dict[Any, dict[str, Any]], group_by: str, rows: Any) -> None:
    """Adds a query's groups into ``groups`` (the rows' and the day sums' alike)."""
    for row in rows:
        values = list(row)
        if group_by == "key":
            key_id, name = values.pop(0) or None, values.pop(0)
            identity: Any = key_id
            label = {"key_id": key_id, "key": name if key_id else "(no key)"}
        else:
            identity = values.pop(0) or None  # the sums write "" where a row has NULL
            label = {group_by: identity}
        group = groups.setdefault(identity, {**label, "requests": 0, "errors": 0,
                                             "prompt_tokens": 0, "completion_tokens": 0,
                                             "latency_ms": 0.0})
        if group_by == "key" and label["key"] != "(no key)" and label["key"]:
            group["key"] = label["key"]
        requests, errors, prompt, completion, latency = values
        group["requests"] += int(requests or 0)
        group["errors"] += int(errors or 0)
        group["prompt_tokens"] += int(prompt or 0)
        group["completion_tokens"] += int(completion or 0)
        group["latency_ms"] += float(latency or 0.0)


def _finished_row(group: dict[str, Any]) -> dict[str, Any]:
    latency = group.pop("latency_ms")
    group["total_tokens"] = group["prompt_tokens"] + group["completion_tokens"]
    group["mean_latency_ms"] = round(latency / group["requests"], 1) \
        if group["requests"] else 0.0
    return group


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

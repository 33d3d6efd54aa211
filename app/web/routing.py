"""Werkzeug's URL matching, with the answer for each fixed path remembered.

Werkzeug 3's matcher walks its state machine with a nested function that calls itself,
so every match leaves a reference loop (the function, its cells, a set and a tuple: 8
objects) that only the garbage collector frees. Measured in a gateway under stream
c=256, that was all the cyclic garbage of a request, and a third of what starts the
collector's young collections. Nearly every request goes to a fixed path
(/v1/chat/completions), so the rule found for one is kept and the walk skipped.

Only fixed paths are kept (a rule without variable parts, found by the matcher itself),
at most MAX_PATHS of them: a path with an id in it, or a client's made-up path or method,
still goes to the matcher every time, and nothing a client sends can grow the table past
the app's own routes.
"""
from __future__ import annotations

from typing import Any

from flask import Flask

MAX_PATHS = 256  # (host part, path, method, websocket) answers kept


class _FixedPathMatcher:
    """Stands in for the Map's matcher: ``match`` as Werkzeug's, the rest passed on."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher
        self._found: dict[tuple[str, str, str, bool], tuple[Any, dict[str, Any]]] = {}

    def match(self, domain: str, path: str, method: str, websocket: bool
              ) -> tuple[Any, dict[str, Any]]:
        key = (domain, path, method, websocket)
        found = self._found.get(key)
        if found is not None:
            rule, values = found
            return rule, dict(values)  # (a view may change its arguments)
        rule, values = self._matcher.match(domain, path, method, websocket)
        if not rule.arguments and len(self._found) < MAX_PATHS:
            self._found[key] = (rule, dict(values))
        return rule, values

    def add(self, rule: Any) -> None:
        self._found.clear()
        self._matcher.add(rule)

    def update(self) -> None:
        self._found.clear()
        self._matcher.update()

    def __getattr__(self, name: str) -> Any:  # merge_slashes and whatever else it has
        if name in ("_matcher", "_found"):  # (not set yet: a copy being made)
            raise AttributeError(name)
        return getattr(self._matcher, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("_matcher", "_found"):
            object.__setattr__(self, name, value)
        else:
            self._found.clear()
            setattr(self._matcher, name, value)


def remember_fixed_paths(app: Flask) -> None:
    """Wraps ``app``'s URL matcher (a Werkzeug without one is left as it is)."""
    url_map: Any = app.url_map
    matcher = getattr(url_map, "_matcher", None)
    if matcher is not None and callable(getattr(matcher, "match", None)):
        url_map._matcher = _FixedPathMatcher(matcher)

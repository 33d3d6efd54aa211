"""flaskchat's controller wrapped in a request counter, for the benchmarks.

    gunicorn -k gthread --threads 16 'bench.counting_controller:app'

GET /bench/stats gives the calls per path since the last POST /bench/reset.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterable

import orjson

from app.controller import create_controller_app

_inner = create_controller_app()
calls: Counter[str] = Counter()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path.startswith("/bench/"):
        if path == "/bench/reset":
            calls.clear()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [orjson.dumps({"calls": dict(calls)})]
    calls[path] += 1
    result: Iterable[bytes] = _inner(environ, start_response)
    return result

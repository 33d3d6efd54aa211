"""The remembered URL matches (app.web.routing), in process: the same answers as
Werkzeug's matcher, without its per-match reference loop, and nothing a client sends
grows the table."""
from __future__ import annotations

import gc
from typing import Mapping

import pytest
from flask import Flask, request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from app.web import routing


@pytest.fixture()
def app() -> Flask:
    app = Flask(__name__)

    @app.post("/v1/chat/completions")
    def chat() -> str:
        return "chat"

    @app.get("/v1/responses/<response_id>")
    def stored(response_id: str) -> str:
        return response_id

    @app.get("/v1/models", defaults={"page": 1})
    def models(page: int) -> str:
        return str(page)

    routing.remember_fixed_paths(app)
    return app


def _match(app: Flask, path: str, method: str) -> tuple[str, dict[str, object]]:
    with app.test_request_context(path, method=method):
        rule = request.url_rule
        assert rule is not None and rule.endpoint is not None
        return rule.endpoint, dict(request.view_args or {})


def _remembered(app: Flask) -> Mapping[tuple[str, str, str, bool], object]:
    matcher = app.url_map._matcher
    assert isinstance(matcher, routing._FixedPathMatcher)
    return matcher._found


def test_a_fixed_path_is_matched_once_and_leaves_no_loop(app: Flask) -> None:
    assert _match(app, "/v1/chat/completions", "POST") == ("chat", {})
    assert list(_remembered(app)) == [("", "/v1/chat/completions", "POST", False)]
    adapter = app.url_map.bind("localhost")
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            assert adapter.match("/v1/chat/completions", "POST") == ("chat", {})
        assert gc.collect() == 0  # Werkzeug's own walk leaves 8 objects in a loop per match
    finally:
        gc.enable()


def test_paths_with_ids_defaults_and_refusals_go_to_the_matcher_every_time(
        app: Flask) -> None:
    for n in range(3):
        assert _match(app, f"/v1/responses/resp_{n}", "GET") == (
            "stored", {"response_id": f"resp_{n}"})
    assert _match(app, "/v1/models", "GET") == ("models", {"page": 1})
    adapter = app.url_map.bind("localhost")
    with pytest.raises(MethodNotAllowed):
        adapter.match("/v1/chat/completions", "X" * 5000)
    with pytest.raises(NotFound):
        adapter.match("/v1/" + "made-up", "POST")
    assert not _remembered(app)


def test_a_views_changed_arguments_are_not_the_next_requests(app: Flask) -> None:
    adapter = app.url_map.bind("localhost")
    for _ in range(2):
        _, values = adapter.match("/v1/chat/completions", "POST")
        assert values == {}
        assert isinstance(values, dict)
        values["changed"] = True  # what a url_value_preprocessor may do


def test_the_table_never_grows_past_its_bound(app: Flask,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing, "MAX_PATHS", 2)
    for name in ("a", "b", "c", "d"):
        app.add_url_rule(f"/{name}", name, lambda: "x")
    for name in ("a", "b", "c", "d"):
        assert _match(app, f"/{name}", "GET")[0] == name
    assert len(_remembered(app)) == 2
    app.add_url_rule("/e", "e", lambda: "x")  # a new rule: what was found may not hold
    assert not _remembered(app)

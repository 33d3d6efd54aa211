"""Settings precedence, `gunicorn -c gunicorn.conf.py wsgi:app` from env vars, and CORS."""
from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pytest
import requests

from app.cli import main
from app.config import Settings, add_arguments, parse_list
from app.upstream.openai_config import UpstreamConfigError, load_targets
from tests.conftest import Server, Stack, start_on_socket


def parse(argv: list[str], env: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser()
    add_arguments(parser, Settings)
    return Settings.from_args(parser.parse_args(argv), env)


def test_flag_beats_env_beats_default() -> None:
    assert parse([], {}).read_timeout == 100.0
    assert parse([], {"FASTCHAT_WORKER_API_TIMEOUT": "7"}).read_timeout == 7.0
    assert parse([], {"FLASKCHAT_READ_TIMEOUT": "8",
                      "FASTCHAT_WORKER_API_TIMEOUT": "7"}).read_timeout == 8.0
    assert parse(["--read-timeout", "9"], {"FLASKCHAT_READ_TIMEOUT": "8"}).read_timeout == 9.0
    assert parse([], {"FASTCHAT_WORKER_API_EMBEDDING_BATCH_SIZE": "16"}
                 ).embedding_batch_size == 16
    assert parse(["--allow-credentials"], {}).allow_credentials is True
    assert parse([], {"FLASKCHAT_ALLOW_CREDENTIALS": "true"}).allow_credentials is True
    assert parse(["--controller-address", "http://c:1/"], {}).controller_address == "http://c:1"


def test_lists_take_fastchat_json_or_commas(tmp_path: Path) -> None:
    assert parse_list('["https://a.example", "https://b.example"]') == (
        "https://a.example", "https://b.example")
    assert parse_list("k1, k2,,") == ("k1", "k2")
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nkey-one\n\nkey-two\n")
    assert parse(["--api-keys-file", str(keys)], {}).api_keys == ("key-one", "key-two")
    assert parse([], {"FLASKCHAT_API_KEYS": "a,b"}).api_keys == ("a", "b")
    assert parse([], {"API_KEYS": "c"}).api_keys == ("c",)


def test_bad_flag_values_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--workers", "0"])
    assert "--workers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse([], {"FLASKCHAT_PORT": "eighty"})
    # the worker's engine flags, refused before any model is loaded
    for flag, value in (("--engine", "gpu"), ("--max-context", "0")):
        with pytest.raises(SystemExit) as exit_info:
            main(["worker", flag, value])
        assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_model_capacities_and_upstream_concurrency_are_checked(tmp_path: Path) -> None:
    settings = parse(["--model-capacity", "a=2", "--model-capacity", "b=8"],
                     {"FLASKCHAT_MODEL_CAPACITY": "c=1"})
    assert settings.model_capacities == {"a": 2, "b": 8}  # the flags beat the variable
    assert parse([], {"FLASKCHAT_MODEL_CAPACITY": "c=1,d=3"}).model_capacities == \
        {"c": 1, "d": 3}
    for bad in ("a", "a=0", "a=-1", "=2", "a=two"):
        with pytest.raises(SystemExit, match="model-capacity|MODEL_CAPACITY"):
            parse(["--model-capacity", bad], {})
    upstreams = tmp_path / "upstreams.toml"
    for bad in ("0", "-2", "1.5", '"8"', "true"):
        upstreams.write_text('[[upstream]]\nbase_url = "http://gpu:8000/v1"\n'
                             f'models = ["m"]\nmax_concurrency = {bad}\n')
        with pytest.raises(UpstreamConfigError, match="max_concurrency must be a positive"):
            load_targets((), str(upstreams), 5.0)
    upstreams.write_text('[[upstream]]\nbase_url = "http://gpu:8000/v1"\n'
                         'models = ["m"]\nmax_concurrency = 8\n')
    assert load_targets((), str(upstreams), 5.0)["m"][0].max_concurrency == 8


def test_one_duration_format_for_flags_the_cli_and_the_admin_api(tmp_path: Path) -> None:
    """``--responses-ttl 2w`` used to be refused while ``--expires 2w`` worked."""
    from app.access.reports import parse_since
    from app.config import parse_duration, parse_size
    from schemas.admin import KeyCreateSchema

    for text, seconds in (("2w", 1209600), ("30d", 2592000), ("12h", 43200), ("90m", 5400),
                          ("45s", 45), ("30", 30), ("1.5h", 5400)):
        assert parse_duration(text) == seconds
        assert parse([], {"FLASKCHAT_RESPONSES_TTL": text}).responses_ttl == seconds
        assert parse(["--usage-retention", text], {}).usage_retention == seconds
        loaded = KeyCreateSchema().load({"name": "k", "expires_in": text})
        assert loaded["expires_in"].total_seconds() == seconds
    assert parse([], {"FLASKCHAT_READ_TIMEOUT": "2m"}).read_timeout == 120
    assert (datetime(2026, 1, 15) - parse_since("2w", datetime(2026, 1, 15))).days == 14
    for bad in ("0", "-1d", "soon", "1y", "2 weeks", "1e9d"):
        with pytest.raises(ValueError):
            parse_duration(bad)
        with pytest.raises(SystemExit):
            parse([], {"FLASKCHAT_RESPONSES_TTL": bad})
    made = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "--name",
                           "two-weeks", "--expires", "2w", "--json", "--database-url",
                           f"sqlite:///{tmp_path}/keys.db"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert parse_size("1MiB") == parse_size("1048576") == 1 << 20
    assert parse([], {"FLASKCHAT_RESPONSES_MAX_BYTES": "64KiB"}).responses_max_bytes == 65536
    for bad in ("0", "1TB", "-5", "lots"):
        with pytest.raises(ValueError):
            parse_size(bad)


@pytest.fixture(scope="module")
def env_gateway(stack: Stack) -> Iterator[Server]:
    """The gateway as an operator runs it: gunicorn with our config file, env settings."""
    server = start_on_socket(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app",
         "--bind", "fd://{fd}"], "/health",
        env={"FLASKCHAT_CONTROLLER_ADDRESS": stack.controller.url,
             "FLASKCHAT_ALLOWED_ORIGINS": '["https://app.example"]',
             "FLASKCHAT_ALLOW_CREDENTIALS": "1", "FLASKCHAT_LOG_LEVEL": "warning"})
    yield server
    server.stop()


def test_gunicorn_conf_serves_with_env_settings(env_gateway: Server) -> None:
    response = requests.post(env_gateway.url + "/v1/chat/completions", json={
        "model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 200  # no keys configured: auth is off
    assert response.json()["choices"][0]["message"]["content"]


def test_cors_preflight_allowed_and_refused(env_gateway: Server) -> None:
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = requests.options(env_gateway.url + "/v1/chat/completions",
                               headers={"Origin": "https://app.example", **preflight})
    assert allowed.status_code == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert allowed.headers["Access-Control-Allow-Credentials"] == "true"
    assert "POST" in allowed.headers["Access-Control-Allow-Methods"]
    assert "authorization" in allowed.headers["Access-Control-Allow-Headers"]
    refused = requests.options(env_gateway.url + "/v1/chat/completions",
                               headers={"Origin": "https://evil.example", **preflight})
    assert "Access-Control-Allow-Origin" not in refused.headers
    simple = requests.get(env_gateway.url + "/v1/models",
                          headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in simple.headers


def test_cors_is_closed_by_default(stack: Stack) -> None:
    response = requests.options(stack.gateway.url + "/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in response.headers
    response = requests.get(stack.gateway.url + "/health",
                            headers={"Origin": "https://app.example"})
    assert "Access-Control-Allow-Origin" not in response.headers

"""Per-key access on one host, in an SQLite file: keys made by the CLI and the admin API,
rpm / tpm / parallel limits with OpenAI's headers, budgets, model restrictions on every
route, a key's share (weight and service tiers, and whom it counts against), usage
records, the schema a previous release left, and the bad input around all of it. Real
gateways under gunicorn, the session's controller and fake workers, the official openai
client and raw HTTP."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
import requests
from sqlalchemy import create_engine, func, select, text

from app.access.budgets import Budgets
from app.access.database import engine_for, revision, upgrade
from app.access.directory import ANONYMOUS, KeyDirectory
from app.access.keys import KeyStore
from app.access.tables import api_keys, schema_releases, usage
from tests.conftest import (ROOT, Server, Stack, new_database_url, start_gateway, wait_for)
from tests.nginx import free_port

ADMIN_KEY = "admin-key-5a9c1e77"
LEGACY_KEY = "legacy-flag-key-42"
# Short refresh and flush so that tests wait little; the defaults are 2 s and 1 s.
FAST = {"FLASKCHAT_KEYS_REFRESH": "0.5", "FLASKCHAT_USAGE_FLUSH_INTERVAL": "0.2",
        "FLASKCHAT_ADMIN_KEYS": ADMIN_KEY}


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)


def admin(gateway: Server, method: str, path: str, key: str = ADMIN_KEY,
          **options: Any) -> requests.Response:
    return requests.request(method, gateway.url + "/admin/v1" + path, timeout=10,
                            headers={"Authorization": f"Bearer {key}"}, **options)


def make_key(gateway: Server, **fields: Any) -> dict[str, Any]:
    response = admin(gateway, "POST", "/keys", json=fields)
    assert response.status_code == 201, response.text
    made: dict[str, Any] = response.json()
    return made


def chat(gateway: Server, key: str | None, model: str = "fake-model", text: str = "hi",
         **extra: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(gateway.url + "/v1/chat/completions", headers=headers, timeout=30,
                         json={"model": model, "messages": [{"role": "user", "content": text}],
                               **extra})


def usage_of(gateway: Server, key_id: str) -> dict[str, Any]:
    rows = admin(gateway, "GET", "/usage?group_by=key&since=1d").json()["data"]
    return next((row for row in rows if row["key_id"] == key_id), {"requests": 0})


def wait_for_usage(gateway: Server, key_id: str, requests_seen: int,
                   timeout: float = 15) -> dict[str, Any]:
    found: dict[str, Any] = wait_for(
        lambda: (row := usage_of(gateway, key_id))["requests"] >= requests_seen and row,
        timeout, f"{requests_seen} usage records")
    return found


def assert_envelope(response: requests.Response, status: int, code: str | None = None,
                    param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.fixture(scope="module")
def log_file() -> Iterator[Path]:
    with tempfile.NamedTemporaryFile(prefix="flaskchat-keys-", suffix=".log",
                                     delete=False) as handle:
        path = Path(handle.name)
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def database_url() -> str:
    return new_database_url()


@pytest.fixture(scope="module")
def gateway(stack: Stack, log_file: Path, database_url: str) -> Iterator[Server]:
    """One process (its limits are exact without Redis), an info log to search for keys."""
    with open(log_file, "ab") as log:
        server = start_gateway(stack.controller.url, "--workers", "1", "--api-keys",
                               LEGACY_KEY, stderr=log,
                               env={**FAST, "FLASKCHAT_DATABASE_URL": database_url,
                                    "FLASKCHAT_LOG_LEVEL": "info"})
    yield server
    server.stop()


# ---- keys come and go --------------------------------------------------------------------

def test_auth_is_off_until_the_first_key_is_made_then_on(stack: Stack) -> None:
    url = new_database_url()
    with tempfile.TemporaryFile() as log:
        server = start_gateway(stack.controller.url, "--workers", "2", stderr=log,
                               env={**FAST, "FLASKCHAT_DATABASE_URL": url})
        try:
            assert chat(server, None).status_code == 200  # as `flaskchat up` users expect
            made = cli("keys", "create", "--name", "first", "--team", "core", "--json",
                       "--database-url", url)
            assert made.returncode == 0, made.stderr
            secret = json.loads(made.stdout)["secret"]
            assert secret.startswith("fc-") and len(secret) >= 3 + 43  # >= 256 random bits
            # Every process turns auth on within a key refresh (0.5 s here).
            # (20 in a row: 6 could all go to one process, as one run saw)
            wait_for(lambda: all(chat(server, None).status_code == 401 for _ in range(20)), 5,
                     "anonymous requests to be refused by both processes")
            assert chat(server, secret).status_code == 200
            assert_envelope(chat(server, "fc-not-a-key"), 401, "invalid_api_key")
        finally:
            server.stop()
        log.seek(0)
        warnings = log.read().decode()
    # Two processes and no Redis: the server says it enforces each process's share.
    assert "--redis-url" in warnings and "warning" in warnings
    # Only a hash is stored: the secret is nowhere in the database file.
    database_file = Path(url.removeprefix("sqlite:///"))
    assert secret.encode() not in database_file.read_bytes()
    engine = create_engine(url)
    with engine.connect() as connection:
        stored = connection.execute(select(api_keys)).mappings().one()
    engine.dispose()
    assert secret not in json.dumps({k: str(v) for k, v in stored.items()})
    assert stored["hint"] == "fc-..." + secret[-4:]


def test_revoked_and_changed_keys_take_effect_within_seconds(gateway: Server,
                                                             database_url: str) -> None:
    made = make_key(gateway, name="short-lived")
    secret = made["secret"]
    assert chat(gateway, secret).status_code == 200
    changed = admin(gateway, "PATCH", f"/keys/{made['id']}", json={"rpm": 1})
    assert changed.status_code == 200 and changed.json()["rpm"] == 1
    wait_for(lambda: chat(gateway, secret).status_code == 429, 5, "the new rpm")
    revoked = cli("keys", "revoke", "short-lived", "--database-url", database_url)
    assert revoked.returncode == 0, revoked.stderr
    wait_for(lambda: chat(gateway, secret).status_code == 401, 5, "the revocation")
    listed = {key["name"]: key for key in admin(gateway, "GET", "/keys").json()["data"]}
    assert listed["short-lived"]["status"] == "revoked"
    expired = make_key(gateway, name="expiring", expires_in="1m")
    assert chat(gateway, expired["secret"]).status_code == 200
    admin(gateway, "PATCH", "/keys/expiring", json={"expires_in": None})
    assert admin(gateway, "GET", "/keys/expiring").json()["expires_at"] is None


def test_flag_keys_stay_unlimited_beside_database_keys(gateway: Server) -> None:
    limited = make_key(gateway, name="one-a-minute", rpm=1)
    for _ in range(4):
        response = chat(gateway, LEGACY_KEY)
        assert response.status_code == 200
        assert "x-ratelimit-limit-requests" not in response.headers
    assert chat(gateway, limited["secret"]).status_code == 200
    assert_envelope(chat(gateway, limited["secret"]), 429, "rate_limit_exceeded")


# ---- limits --------------------------------------------------------------------------------

def test_rpm_limit_answers_429_with_openai_headers(gateway: Server) -> None:
    secret = make_key(gateway, name="rpm-three", rpm=3, tpm=100_000)["secret"]
    for remaining in (2, 1, 0):
        response = chat(gateway, secret)
        assert response.status_code == 200
        headers = response.headers
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-remaining-requests"] == str(remaining)
        assert headers["x-ratelimit-limit-tokens"] == "100000"
        assert int(headers["x-ratelimit-remaining-tokens"]) < 100_000
        assert headers["x-ratelimit-reset-requests"].endswith("s")
        assert headers["x-ratelimit-reset-tokens"].endswith("s")
    refused = chat(gateway, secret)
    error = assert_envelope(refused, 429, "rate_limit_exceeded")
    assert error["type"] == "requests" and "rpm" in error["message"].lower() or \
        "requests per minute" in error["message"].lower()
    # A sliding minute: the wait can reach into the next minute (at most two).
    assert 1 <= int(refused.headers["Retry-After"]) <= 120
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # A refused request is not served, and the client can tell when to come back.
    assert "retry-after-ms" in refused.headers


def test_tpm_limit_counts_prompt_and_completion_tokens(gateway: Server) -> None:
    secret = make_key(gateway, name="tpm-sixty", tpm=60)["secret"]
    statuses = []
    for _ in range(20):
        response = chat(gateway, secret, text="count these words please")
        statuses.append(response.status_code)
        if response.status_code == 429:
            error = assert_envelope(response, 429, "rate_limit_exceeded")
            assert error["type"] == "tokens"
            assert response.headers["x-ratelimit-limit-tokens"] == "60"
            assert int(response.headers["Retry-After"]) >= 1
            break
        assert response.headers["x-ratelimit-limit-tokens"] == "60"
    assert statuses[-1] == 429 and statuses.count(200) >= 1
    # Each request is ~10 tokens in all: 60 a minute is a few requests, not 20.
    assert len(statuses) <= 12


def test_max_parallel_and_the_openai_clients_retry(gateway: Server) -> None:
    made = make_key(gateway, name="one-at-a-time", max_parallel=1)
    secret = made["secret"]
    holding = threading.Event()

    def hold_the_slot() -> None:  # a slow stream, once it is in
        while True:
            with requests.post(gateway.url + "/v1/chat/completions", stream=True, timeout=30,
                               headers={"Authorization": f"Bearer {secret}"},
                               json={"model": "fake-model", "stream": True, "messages": [
                                   {"role": "user", "content": "[[slow:0.3]]"}]}) as response:
                if response.status_code == 200:
                    holding.set()
                    response.content
                    return
            time.sleep(0.05)
    slow = threading.Thread(target=hold_the_slot)
    slow.start()
    assert holding.wait(10)
    refused = chat(gateway, secret)
    error = assert_envelope(refused, 429, "rate_limit_exceeded")
    assert "parallel" in error["message"] and int(refused.headers["Retry-After"]) >= 1
    # The official client reads Retry-After and tries again: the call gets through once
    # the slow one ends (about 2 s), with no error seen by its caller.
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=secret, max_retries=8)
    reply = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "[[reply:through]]"}])
    client.close()
    assert reply.choices[0].message.content == "through"
    slow.join(30)


def test_budget_spent_is_insufficient_quota_and_the_client_does_not_retry(
        gateway: Server) -> None:
    made = make_key(gateway, name="small-budget", budget_tokens=30, budget_period="day")
    secret = made["secret"]
    for sent in range(1, 11):
        response = chat(gateway, secret)
        if response.status_code == 429:
            break
        assert response.status_code == 200
    error = assert_envelope(response, 429, "insufficient_quota")
    assert error["type"] == "insufficient_quota" and "budget" in error["message"]
    before = wait_for_usage(gateway, made["id"], sent)["requests"]
    assert before == sent
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=secret, max_retries=4)
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="fake-model",
                                       messages=[{"role": "user", "content": "hi"}])
    client.close()
    assert raised.value.code == "insufficient_quota"
    # One call, one request: x-should-retry: false stops the client's retries.
    assert wait_for_usage(gateway, made["id"], before + 1)["requests"] == before + 1
    time.sleep(0.6)
    assert usage_of(gateway, made["id"])["requests"] == before + 1


# ---- models a key may use ------------------------------------------------------------------

def test_a_key_limited_to_some_models_sees_only_those_everywhere(gateway: Server) -> None:
    secret = make_key(gateway, name="vicuna-only", models=["vicuna-stock"])["secret"]
    auth = {"Authorization": f"Bearer {secret}"}
    listed = requests.get(gateway.url + "/v1/models", headers=auth, timeout=10).json()
    assert [model["id"] for model in listed["data"]] == ["vicuna-stock"]
    assert chat(gateway, secret, model="vicuna-stock").status_code == 200
    refused = [
        requests.get(gateway.url + "/v1/models/fake-model", headers=auth, timeout=10),
        chat(gateway, secret, model="fake-model"),
        requests.post(gateway.url + "/v1/completions", headers=auth, timeout=10,
                      json={"model": "fake-model", "prompt": "hi"}),
        requests.post(gateway.url + "/v1/embeddings", headers=auth, timeout=10,
                      json={"model": "fake-model", "input": "hi"}),
        requests.post(gateway.url + "/v1/engines/fake-model/embeddings", headers=auth,
                      timeout=10, json={"input": "hi"}),
        requests.post(gateway.url + "/api/v1/chat/completions", headers=auth, timeout=10,
                      json={"model": "fake-model",
                            "messages": [{"role": "user", "content": "hi"}]}),
        requests.post(gateway.url + "/api/v1/token_check", headers=auth, timeout=10,
                      json={"prompts": [{"model": "vicuna-stock", "prompt": "a",
                                         "max_tokens": 1},
                                        {"model": "fake-model", "prompt": "b",
                                         "max_tokens": 1}]}),
        requests.post(gateway.url + "/demo/streams", headers=auth, timeout=10,
                      json={"model": "fake-model",
                            "messages": [{"role": "user", "content": "hi"}]}),
    ]
    for response in refused:
        error = assert_envelope(response, 404, "model_not_found")
        assert "fake-model" in error["message"], response.url
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=secret, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="fake-model", input="hi")
    assert [model.id for model in client.models.list()] == ["vicuna-stock"]
    client.close()


# ---- usage ---------------------------------------------------------------------------------

def test_every_request_is_one_usage_record(gateway: Server, database_url: str) -> None:
    made = make_key(gateway, name="usage-counted", team="analytics")
    secret = made["secret"]
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=secret, max_retries=0)
    client.chat.completions.create(model="fake-model",
                                   messages=[{"role": "user", "content": "hi"}])
    for _ in client.chat.completions.create(model="fake-model", stream=True,
                                            messages=[{"role": "user", "content": "hi"}]):
        pass
    client.completions.create(model="fake-model", prompt="hi")
    client.embeddings.create(model="fake-model", input=["a", "b"])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model",
                                       messages=[{"role": "user", "content": "hi"}])
    client.close()
    row = wait_for_usage(gateway, made["id"], 5)
    assert row["requests"] == 5 and row["errors"] == 1 and row["key"] == "usage-counted"
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
    engine = create_engine(database_url)
    with engine.connect() as connection:
        records = connection.execute(
            select(usage).where(usage.c.key_id == made["id"])).mappings().all()
    engine.dispose()
    assert len(records) == 5
    assert {record["route"] for record in records} == {
        "/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
    assert all(record["team"] == "analytics" and record["request_id"] for record in records)
    timed = [r for r in records if r["ttft_ms"] is not None]
    assert timed and all(r["latency_ms"] >= r["ttft_ms"] for r in timed)
    assert {r["model"] for r in records if r["status"] == 404} == {None}
    # The team lead's view: the CLI reads the same database.
    shown = cli("usage", "--by", "team", "--json", "--database-url", database_url)
    assert shown.returncode == 0, shown.stderr
    teams = {row["team"]: row for row in json.loads(shown.stdout)["data"]}
    assert teams["analytics"]["requests"] == 5
    table = cli("usage", "--by", "key", "--database-url", database_url)
    assert "usage-counted" in table.stdout


def test_a_stream_the_client_leaves_is_charged_what_was_generated(gateway: Server) -> None:
    made = make_key(gateway, name="leaves-early")
    words = " ".join(f"w{i}" for i in range(30))
    with requests.post(gateway.url + "/v1/chat/completions", stream=True, timeout=30,
                       headers={"Authorization": f"Bearer {made['secret']}"},
                       json={"model": "fake-model", "stream": True, "messages": [
                           {"role": "user", "content": f"[[slow:0.1]][[reply:{words}]]"}]}
                       ) as response:
        content = []
        for line in response.iter_lines():
            if line.startswith(b"data: {"):
                content.append(line)
            if len(content) >= 4:
                break
    row = wait_for_usage(gateway, made["id"], 1)
    assert row["requests"] == 1
    assert 3 <= row["completion_tokens"] < 30, row
    assert row["prompt_tokens"] > 0


def test_usage_report_groups_and_daily_chart(gateway: Server) -> None:
    for group in ("key", "team", "model", "day"):
        response = admin(gateway, "GET", f"/usage?group_by={group}&since=7d")
        assert response.status_code == 200, response.text
        assert response.json()["group_by"] == group
    daily = admin(gateway, "GET", "/usage/daily?days=30").json()
    assert len(daily["days"]) == 30
    wait_for(lambda: sum(admin(gateway, "GET", "/usage/daily").json()["teams"].get(
        "analytics", [0])) > 0, 10, "the daily totals")


def test_keys_never_reach_logs_or_metrics(gateway: Server, log_file: Path) -> None:
    secrets = [make_key(gateway, name=f"secret-{i}")["secret"] for i in range(2)]
    for secret in secrets:
        chat(gateway, secret)
        requests.get(gateway.url + "/v1/models", timeout=10,
                     headers={"Authorization": f"Bearer {secret}"})
    chat(gateway, "fc-wrong-key-that-must-not-be-logged")
    # Named by its name, counted at the next usage flush.
    metrics: str = wait_for(lambda: 'key="secret-0"' in (text := requests.get(
        gateway.url + "/metrics", timeout=10).text) and text, 5, "the key's metrics") or ""
    assert 'flaskchat_rate_limited_total{reason="requests"}' in metrics
    time.sleep(0.3)
    logged = log_file.read_text()
    assert "/v1/chat/completions" in logged  # the access log is on
    for secret in [*secrets, ADMIN_KEY, LEGACY_KEY, "fc-wrong-key-that-must-not-be-logged"]:
        assert secret not in logged and secret not in metrics


# ---- the admin API and its bad input -------------------------------------------------------

BAD_ADMIN_REQUESTS = [
    ("POST", "/keys", {"name": "x", "rmp": 5}, "rmp"),
    ("POST", "/keys", {"name": ""}, "name"),
    ("POST", "/keys", {"team": "t"}, "name"),
    ("POST", "/keys", {"name": "bad\nname"}, "name"),
    ("POST", "/keys", {"name": "x", "rpm": -1}, "rpm"),
    ("POST", "/keys", {"name": "x", "rpm": "ten"}, "rpm"),
    ("POST", "/keys", {"name": "x", "tpm": 1.5}, "tpm"),
    ("POST", "/keys", {"name": "x", "models": []}, "models"),
    ("POST", "/keys", {"name": "x", "models": "fake-model"}, "models"),
    ("POST", "/keys", {"name": "x", "budget_tokens": 10}, "budget_tokens"),
    ("POST", "/keys", {"name": "x", "budget_tokens": 10, "budget_period": "week"},
     "budget_period"),
    ("POST", "/keys", {"name": "x", "expires_in": "soon"}, "expires_in"),
    ("POST", "/keys", [1, 2], None),
    ("POST", "/keys", {"name": "x", "weight": 0}, "weight"),
    ("POST", "/keys", {"name": "x", "weight": -1}, "weight"),
    ("POST", "/keys", {"name": "x", "weight": 1001}, "weight"),
    ("POST", "/keys", {"name": "x", "weight": "x"}, "weight"),
    ("POST", "/keys", {"name": "x", "weight": True}, "weight"),
    ("POST", "/keys", {"name": "x", "weight": None}, "weight"),
    ("POST", "/keys", {"name": "x", "max_tier": "gold"}, "max_tier"),
    ("POST", "/keys", {"name": "x", "max_tier": None}, "max_tier"),
    ("POST", "/keys", {"name": "x", "default_tier": "gold"}, "default_tier"),
    ("POST", "/keys", {"name": "x", "default_tier": "priority"}, "default_tier"),
    ("POST", "/keys", {"name": "x", "max_tier": "flex", "default_tier": "default"},
     "default_tier"),
    ("PATCH", "/keys/usage-counted", {"name": "renamed"}, "name"),
    ("PATCH", "/keys/usage-counted", {"rpm": 0}, "rpm"),
    ("PATCH", "/keys/usage-counted", {"weight": 1000.5}, "weight"),
    ("PATCH", "/keys/usage-counted", {"max_tier": "gold"}, "max_tier"),
    # Above the max tier it keeps (default).
    ("PATCH", "/keys/usage-counted", {"default_tier": "priority"}, "default_tier"),
    ("GET", "/usage?group_by=colour", None, "group_by"),
    ("GET", "/usage?since=yesterday", None, "since"),
    ("GET", "/usage?limit=3", None, "limit"),
    ("GET", "/usage/daily?days=0", None, "days"),
    ("GET", "/usage/daily?days=abc", None, "days"),
]


@pytest.mark.parametrize("method,path,body,param", BAD_ADMIN_REQUESTS)
def test_malformed_admin_requests_are_400(gateway: Server, method: str, path: str,
                                          body: Any, param: str | None) -> None:
    response = admin(gateway, method, path, json=body)
    assert_envelope(response, 400, param=param)


def test_a_keys_share_round_trips_through_the_admin_api(gateway: Server) -> None:
    made = make_key(gateway, name="batch-job", team="nightly", weight=4, max_tier="flex")
    assert (made["weight"], made["max_tier"], made["default_tier"]) == (4.0, "flex", None)
    plain = make_key(gateway, name="plain-share")
    assert (plain["weight"], plain["max_tier"], plain["default_tier"]) == \
        (1.0, "default", None)
    # The default tier is checked against the max tier the key keeps, and changes with it.
    assert_envelope(admin(gateway, "PATCH", "/keys/batch-job",
                          json={"default_tier": "default"}), 400, param="default_tier")
    changed = admin(gateway, "PATCH", "/keys/batch-job",
                    json={"weight": "2.5", "max_tier": "priority", "default_tier": "default"})
    assert changed.status_code == 200, changed.text
    assert (changed.json()["weight"], changed.json()["max_tier"],
            changed.json()["default_tier"]) == (2.5, "priority", "default")
    # Lowering the max tier below the default tier kept is refused, not half done.
    assert_envelope(admin(gateway, "PATCH", "/keys/batch-job", json={"max_tier": "flex"}),
                    400, param="default_tier")
    assert admin(gateway, "GET", "/keys/batch-job").json()["max_tier"] == "priority"
    for unset in (None, "auto"):  # null, or OpenAI's word: the max tier decides
        cleared = admin(gateway, "PATCH", "/keys/batch-job",
                        json={"default_tier": unset, "weight": 1000})
        assert cleared.status_code == 200, cleared.text
        assert cleared.json()["default_tier"] is None and cleared.json()["weight"] == 1000
    listed = {key["name"]: key for key in admin(gateway, "GET", "/keys").json()["data"]}
    assert (listed["batch-job"]["weight"], listed["batch-job"]["max_tier"]) == \
        (1000.0, "priority")
    # A key with its share set serves requests as before.
    assert chat(gateway, made["secret"]).status_code == 200


def test_admin_api_edge_cases(gateway: Server) -> None:
    not_json = requests.post(gateway.url + "/admin/v1/keys", data=b"{not json", timeout=10,
                             headers={"Authorization": f"Bearer {ADMIN_KEY}",
                                      "Content-Type": "application/json"})
    assert_envelope(not_json, 400)
    assert_envelope(admin(gateway, "GET", "/keys/no-such-key"), 404)
    assert_envelope(admin(gateway, "DELETE", "/keys/no-such-key"), 404)
    make_key(gateway, name="taken")
    assert_envelope(admin(gateway, "POST", "/keys", json={"name": "taken"}), 409,
                    param="name")
    too_big = admin(gateway, "POST", "/keys", json={"name": "x", "team": "t" * 20_000_000})
    assert_envelope(too_big, 413)


def test_only_admin_keys_open_the_admin_api(gateway: Server, stack: Stack) -> None:
    ordinary = make_key(gateway, name="ordinary")["secret"]
    assert_envelope(admin(gateway, "GET", "/keys", key=ordinary), 403,
                    "insufficient_permissions")
    assert_envelope(admin(gateway, "GET", "/keys", key=LEGACY_KEY), 403)
    assert_envelope(admin(gateway, "GET", "/keys", key="wrong-admin-key"), 401)
    no_key = requests.get(gateway.url + "/admin/v1/keys", timeout=10)
    assert_envelope(no_key, 401)
    assert admin(gateway, "GET", "/keys").status_code == 200
    # Without admin keys the admin API is closed to everyone.
    closed = start_gateway(stack.controller.url, "--workers", "1")
    try:
        assert_envelope(admin(closed, "GET", "/keys"), 403)
    finally:
        closed.stop()


# ---- a key's share: weight, tiers, tenant ---------------------------------------------------

def test_a_keys_share_round_trips_through_the_cli() -> None:
    url = new_database_url()
    made = cli("keys", "create", "--name", "share", "--weight", "2.5", "--max-tier",
               "priority", "--default-tier", "default", "--json", "--database-url", url)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert (key["weight"], key["max_tier"], key["default_tier"]) == (2.5, "priority", "default")
    changed = cli("keys", "update", "share", "--weight", "7", "--default-tier", "auto",
                  "--json", "--database-url", url)
    assert changed.returncode == 0, changed.stderr
    key = json.loads(changed.stdout)
    assert (key["weight"], key["max_tier"], key["default_tier"]) == (7.0, "priority", None)
    batch = cli("keys", "update", "share", "--max-tier", "flex", "--database-url", url)
    assert batch.returncode == 0, batch.stderr
    # People see the tier an unset default resolves to.
    assert "weight 7, tiers up to flex, default auto (flex)" in batch.stdout
    listed = cli("keys", "list", "--database-url", url)
    assert "SHARE" in listed.stdout and "default auto (flex)" in listed.stdout


@pytest.fixture(scope="module")
def kept_key_database() -> str:
    """A database with one key, "kept", that no refused change may touch."""
    url = new_database_url()
    made = cli("keys", "create", "--name", "kept", "--database-url", url)
    assert made.returncode == 0, made.stderr
    return url


@pytest.mark.parametrize("flags,words", [
    (["--weight", "0"], "weight must be a number above 0 and at most 1000"),
    (["--weight", "-1"], "weight must be"),
    (["--weight", "1001"], "weight must be"),
    (["--weight", "nan"], "weight must be"),
    (["--weight", "x"], "invalid float value"),
    (["--max-tier", "gold"], "invalid choice"),
    (["--default-tier", "gold"], "invalid choice"),
    (["--default-tier", "priority"], "default_tier 'priority' is above max_tier 'default'"),
    (["--max-tier", "flex", "--default-tier", "default"], "above max_tier 'flex'"),
])
def test_a_bad_share_is_a_cli_error(kept_key_database: str, flags: list[str],
                                    words: str) -> None:
    url = kept_key_database
    for command in (["keys", "create", "--name", "bad-share"], ["keys", "update", "kept"]):
        refused = cli(*command, *flags, "--database-url", url)
        assert refused.returncode == 2 and words in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
    listed = json.loads(cli("keys", "list", "--json", "--database-url", url).stdout)
    assert [(k["name"], k["weight"], k["max_tier"], k["default_tier"]) for k in listed] == \
        [("kept", 1.0, "default", None)]


def test_a_team_counts_as_one_tenant_with_its_heaviest_active_keys_weight() -> None:
    url = new_database_url()
    upgrade(url)
    engine = engine_for(url)
    store = KeyStore(engine)
    made: list[tuple[str, dict[str, Any]]] = [
        ("light", {"team": "search", "weight": 2}),
        ("heavy", {"team": "search", "weight": 5, "max_tier": "priority"}),
        ("gone", {"team": "search", "weight": 9}),
        ("alone", {"weight": 3, "max_tier": "flex"}),
    ]
    secrets = {name: store.create(name, **fields)[1] for name, fields in made}
    store.revoke("gone")  # an inactive key does not weigh for its team
    directory = KeyDirectory(store, (LEGACY_KEY,), 60.0, Budgets())
    assert directory.reload()
    light, heavy = (directory.authenticate(secrets[n]) for n in ("light", "heavy"))
    assert (light.tenant, light.weight, light.max_tier, light.default_tier) == \
        ("search", 5.0, "default", "default")
    assert (heavy.tenant, heavy.weight, heavy.max_tier, heavy.default_tier) == \
        ("search", 5.0, "priority", "default")
    alone = directory.authenticate(secrets["alone"])
    # Without a team, the key is its own tenant; a batch key's requests default to flex.
    assert alone.tenant == alone.key_id and alone.tenant.startswith("key_")
    assert (alone.weight, alone.max_tier, alone.default_tier) == (3.0, "flex", "flex")
    flag = directory.authenticate(LEGACY_KEY)
    assert flag.tenant == flag.owner and flag.tenant.startswith("flag_")
    assert (flag.weight, flag.max_tier, flag.default_tier) == (1.0, "default", "default")
    assert (ANONYMOUS.tenant, ANONYMOUS.weight, ANONYMOUS.max_tier,
            ANONYMOUS.default_tier) == ("anonymous", 1.0, "default", "default")
    # A team key changed elsewhere changes the team's weight at the next read, for every
    # key of the team; a key made since the last read weighs from its first request.
    store.update("light", weight=8)
    assert directory.reload()
    assert directory.authenticate(secrets["heavy"]).weight == 8.0
    newer = store.create("newer", team="search", weight=11)[1]
    assert directory.authenticate(newer).weight == 11.0
    assert directory.authenticate(secrets["heavy"]).weight == 11.0
    assert directory.principal(light.key_id, light.owner) == \
        directory.authenticate(secrets["light"])
    engine.dispose()


def test_a_database_a_previous_release_left_at_0003_migrates() -> None:
    """Its keys read as weight 1, max tier default, default tier unset; the new revision
    says a release at 0003 can still run on it (it writes no share: the defaults apply)."""
    url = new_database_url()
    upgrade(url, to="0003")
    engine = create_engine(url)
    insert_old_key = text(
        "INSERT INTO api_keys (id, name, team, secret_hash, hint, created_at, updated_at) "
        "VALUES (:id, :name, 't', :hash, 'fc-...old1', '2024-01-01', '2024-01-01')")
    with engine.begin() as connection:
        connection.execute(insert_old_key, {"id": "key_old", "name": "old", "hash": "0" * 64})
    assert revision(url) == "0003"
    listed = cli("keys", "list", "--json", "--database-url", url)  # brings the file to 0004
    assert listed.returncode == 0, listed.stderr
    assert [(k["name"], k["weight"], k["max_tier"], k["default_tier"])
            for k in json.loads(listed.stdout)] == [("old", 1.0, "default", None)]
    assert revision(url) == "0004"
    with engine.begin() as connection:
        releases = dict(connection.execute(select(schema_releases.c.revision,
                                                  schema_releases.c.oldest_release)).all())
        # What a release at 0003 writes still goes in.
        connection.execute(insert_old_key, {"id": "key_older", "name": "older",
                                            "hash": "1" * 64})
        stored = connection.execute(select(api_keys.c.weight, api_keys.c.max_tier,
                                           api_keys.c.default_tier)
                                    .where(api_keys.c.id == "key_older")).one()
    engine.dispose()
    assert releases["0004"] == "0003"
    assert tuple(stored) == (1.0, "default", None)


# ---- storage that is wrong or goes away ----------------------------------------------------

@pytest.mark.parametrize("url,words", [
    ("postgresql+psycopg://nobody@127.0.0.1:1/flaskchat", "cannot reach"),
    ("mysql://root@127.0.0.1/flaskchat", "unsupported database"),
    ("sqlite:////dev/null/cannot-be-a-dir/keys.db", "sqlite"),
    ("not a url", "database"),
])
def test_a_bad_database_url_stops_the_server_at_start(url: str, words: str) -> None:
    started = cli("serve", "--port", str(free_port()), "--database-url", url, timeout=90)
    assert started.returncode == 2, started.stderr[-2000:]
    assert words in started.stderr.lower(), started.stderr[-2000:]
    assert "Traceback" not in started.stderr


def test_a_bad_redis_url_stops_the_server_at_start() -> None:
    started = cli("serve", "--port", str(free_port()), "--database-url", new_database_url(),
                  "--redis-url", "http://example/0", timeout=90)
    assert started.returncode == 2 and "redis" in started.stderr.lower(), started.stderr


def test_concurrent_creates_of_one_name_make_one_key() -> None:
    url = new_database_url()
    assert cli("db", "upgrade", "--database-url", url).returncode == 0
    runs = [subprocess.Popen([sys.executable, "-m", "app.cli", "keys", "create", "--name",
                              "same", "--json", "--database-url", url], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(4)]
    results = [(run.wait(60), *run.communicate()) for run in runs]
    assert sorted(code for code, _, _ in results) == [0, 2, 2, 2], results
    for code, _, err in results:
        if code:
            assert "already" in err and "Traceback" not in err, err
    listed = cli("keys", "list", "--json", "--database-url", url)
    assert [key["name"] for key in json.loads(listed.stdout)] == ["same"]


def test_sigterm_under_load_loses_no_usage_record(stack: Stack) -> None:
    url = new_database_url()
    server = start_gateway(stack.controller.url, "--workers", "2",
                           env={**FAST, "FLASKCHAT_DATABASE_URL": url,
                                # No flush while the test runs: only the stop writes them.
                                "FLASKCHAT_USAGE_FLUSH_INTERVAL": "600",
                                "FLASKCHAT_DRAIN_SECONDS": "1"})
    secret = make_key(server, name="under-load")["secret"]
    answered = 0
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        nonlocal answered
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    response = session.post(
                        server.url + "/v1/chat/completions", timeout=30,
                        headers={"Authorization": f"Bearer {secret}"},
                        json={"model": "fake-model", "stream": answered % 2 == 0,
                              "messages": [{"role": "user", "content": "[[slow:0.02]]"}]})
                    response.content
                except requests.RequestException:
                    return
                with lock:
                    answered += 1
    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    wait_for(lambda: answered >= 30, 30, "requests under load")
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(60)
    stop.set()
    for thread in threads:
        thread.join(30)
    engine = create_engine(url)
    with engine.connect() as connection:
        recorded = connection.execute(select(func.count()).select_from(usage)).scalar_one()
    engine.dispose()
    assert answered >= 30 and recorded == answered

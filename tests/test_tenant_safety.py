"""A hostile tenant against real processes: a controller and fake workers of its own, fake
OpenAI-compatible upstreams (one of which never reports usage), and one gateway process
under gunicorn (its limits exact without Redis) with two --api-keys keys, database keys
made through the admin API, and small storage caps. One test per way a key could cost
another money, data or latency (issue 23's table, in its order), each asserting the
status, the envelope and what the ledger charged."""
from __future__ import annotations

import http.client
import json
import os
import socket
import tempfile
import threading
import time
from typing import Any, Iterator

import pytest
import requests
from sqlalchemy import create_engine, select

from app.access.tables import usage
from tests.conftest import (Server, new_database_url, start_controller, start_fake,
                            start_fake_worker, start_gateway, wait_for)
from tests.nginx import free_port
from tests.test_keys import ADMIN_KEY, FAST, admin, assert_envelope, make_key

STATIC_A, STATIC_B = "static-key-alpha-1f2e", "static-key-beta-9c8d"
MAX_STORED_BYTES = 65536
KEY_QUOTA = 150_000


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Server]]:
    started: dict[str, Server] = {}
    try:
        started["controller"] = start_controller()
        url = started["controller"].url
        started["worker"] = start_fake_worker(url, "--models", "fake-model,secret-model",
                                              "--capabilities", "length_check,messages")
        started["progress"] = start_fake_worker(
            url, "--models", "progress-model", "--capabilities",
            "length_check,messages,generate_progress")
        started["relay"] = start_fake("fake_openai.py", "--models", "relay-model")
        started["quiet"] = start_fake("fake_openai.py", "--models", "quiet-model",
                                      "--no-usage")
        yield started
    finally:
        for server in reversed(list(started.values())):
            server.stop()


@pytest.fixture(scope="module")
def database_url() -> str:
    return new_database_url()


@pytest.fixture(scope="module")
def gateway(servers: dict[str, Server], database_url: str) -> Iterator[Server]:
    server = start_gateway(
        servers["controller"].url, "--workers", "1", "--api-keys", f"{STATIC_A},{STATIC_B}",
        "--openai-upstream", f"relay-model={servers['relay'].url}/v1",
        "--openai-upstream", f"quiet-model={servers['quiet'].url}/v1",
        "--openai-upstream", f"dead-model=http://127.0.0.1:{free_port()}/v1",
        "--openai-upstream", "lost-model=http://gpu-7.nxhost.invalid:8000/v1",
        env={**FAST, "FLASKCHAT_DATABASE_URL": database_url,
             "FLASKCHAT_RESPONSES_MAX_BYTES": str(MAX_STORED_BYTES),
             "FLASKCHAT_RESPONSES_KEY_QUOTA": str(KEY_QUOTA),
             "FLASKCHAT_METRICS_REQUIRE_ADMIN": "1"})
    wait_for(lambda: requests.get(server.url + "/ready", timeout=5).status_code == 200,
             what="the gateway to see the workers")
    yield server
    server.stop()


def post(gateway: Server, key: str, path: str, body: dict[str, Any],
         **options: Any) -> requests.Response:
    return requests.post(gateway.url + path, json=body, timeout=30,
                         headers={"Authorization": f"Bearer {key}"}, **options)


def ask(model: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def records(database_url: str, key_id: str) -> list[dict[str, Any]]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return [dict(row) for row in connection.execute(
                select(usage).where(usage.c.key_id == key_id)).mappings()]
    finally:
        engine.dispose()


def wait_for_records(database_url: str, key_id: str, count: int = 1) -> list[dict[str, Any]]:
    def written() -> list[dict[str, Any]]:
        rows = records(database_url, key_id)
        return rows if len(rows) >= count else []
    found: list[dict[str, Any]] = wait_for(written, 20, f"{count} usage record(s)")
    return found


def leave_after(gateway: Server, key: str, body: bytes, seconds: float) -> None:
    """Sends a request on a raw socket and closes it after ``seconds``: a client that
    leaves a non-stream request."""
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nAuthorization: Bearer " + key.encode()
                     + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                     + body)
        time.sleep(seconds)  # the client's own pace: it leaves mid-generation


# ---- 1. what was generated is charged --------------------------------------------------

def test_a_relayed_stream_left_after_150_chunks_is_charged_150_tokens(
        gateway: Server, database_url: str) -> None:
    made = make_key(gateway, name="leaves-relay")
    with post(gateway, made["secret"], "/v1/chat/completions", ask(
            "relay-model", "[[count:400]][[slow:0.005]]", stream=True), stream=True) as reply:
        assert reply.status_code == 200
        seen = 0
        for line in reply.iter_lines():
            seen += line.startswith(b"data: {") and b'"content":"w' in line
            if seen >= 150:
                break
    (row,) = wait_for_records(database_url, made["id"])
    assert 150 <= row["completion_tokens"] < 400, row
    assert row["prompt_tokens"] > 0


def test_an_upstream_that_ignores_include_usage_is_charged_what_passed(
        gateway: Server, database_url: str) -> None:
    made = make_key(gateway, name="quiet-upstream")
    with post(gateway, made["secret"], "/v1/chat/completions",
              ask("quiet-model", "[[count:50]]", stream=True), stream=True) as reply:
        assert reply.status_code == 200 and b"data: [DONE]" in reply.content
    (row,) = wait_for_records(database_url, made["id"])
    assert row["completion_tokens"] == 50 and row["prompt_tokens"] > 0, row


def test_a_non_stream_request_whose_client_left_is_charged_what_the_worker_made(
        gateway: Server, database_url: str, servers: dict[str, Server]) -> None:
    # A worker that says how far it got, and stops: charged what it made by then.
    made = make_key(gateway, name="leaves-progress")
    requests.post(servers["progress"].url + "/fake/reset", timeout=5)
    leave_after(gateway, made["secret"], json.dumps(
        ask("progress-model", "[[count:60]][[slow:0.05]]")).encode(), 1.0)
    (row,) = wait_for_records(database_url, made["id"])
    assert row["status"] == 499 and 5 <= row["completion_tokens"] < 60, row
    wait_for(lambda: requests.get(servers["progress"].url + "/fake/stats",
                                  timeout=5).json()["cancelled"] == 1,
             what="the generation to stop")
    # A worker that goes on whatever the gateway does (a stock FastChat one): its answer
    # is read to the end and what it made is charged.
    stock = make_key(gateway, name="leaves-stock")
    leave_after(gateway, stock["secret"], json.dumps(
        ask("fake-model", "[[count:20]][[slow:0.05]]")).encode(), 0.3)
    (row,) = wait_for_records(database_url, stock["id"])
    assert row["status"] == 499 and row["completion_tokens"] == 20, row


def test_a_relayed_non_stream_request_whose_client_left_is_charged_its_ceiling(
        gateway: Server, database_url: str) -> None:
    """The request is closed, which stops the upstream; it said nothing of what it had
    made, so the most the request could have made is charged."""
    made = make_key(gateway, name="leaves-relay-non-stream")
    leave_after(gateway, made["secret"], json.dumps(
        ask("relay-model", "[[late]]", max_tokens=40)).encode(), 0.2)
    (row,) = wait_for_records(database_url, made["id"])
    assert row["status"] == 499 and row["completion_tokens"] == 40, row


# ---- 2. reserve, then settle -----------------------------------------------------------

def test_a_budget_is_not_overrun_by_concurrent_requests(gateway: Server,
                                                        database_url: str) -> None:
    made = make_key(gateway, name="tiny-budget", budget_tokens=30, budget_period="day",
                    tpm=2000)
    statuses: list[tuple[int, str | None]] = []
    lock = threading.Lock()

    def send() -> None:
        reply = post(gateway, made["secret"], "/v1/chat/completions",
                     ask("fake-model", "[[count:100]]", n=4))
        code = reply.json()["error"]["code"] if reply.status_code != 200 else None
        with lock:
            statuses.append((reply.status_code, code))
    threads = [threading.Thread(target=send) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(statuses) == 16
    answered = [s for s in statuses if s[0] == 200]
    refused = [s for s in statuses if s[0] == 429]
    assert answered and len(answered) + len(refused) == 16
    assert {code for _, code in refused} == {"insufficient_quota"}
    # Until it is spent (each reply capped by what is left), then the official clients
    # are told not to retry.
    for sent in range(30):
        final = post(gateway, made["secret"], "/v1/chat/completions", ask("fake-model", "hi"))
        if final.status_code == 429 and "x-should-retry" in final.headers:
            break
    assert_envelope(final, 429, "insufficient_quota")
    assert final.headers["x-should-retry"] == "false"
    rows = wait_for_records(database_url, made["id"], 17 + sent)
    spent = sum(row["prompt_tokens"] + row["completion_tokens"] for row in rows)
    assert 0 < spent <= 30 + 30, rows  # at most one reservation past the budget


def test_a_budget_caps_the_reply_it_can_pay_for(gateway: Server, database_url: str) -> None:
    made = make_key(gateway, name="capped-budget", budget_tokens=60, budget_period="month")
    reply = post(gateway, made["secret"], "/v1/chat/completions",
                 ask("fake-model", "[[count:100]]"))
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["finish_reason"] == "length"
    (row,) = wait_for_records(database_url, made["id"])
    assert row["prompt_tokens"] + row["completion_tokens"] <= 60, row


def test_best_of_is_bounded_and_counted(gateway: Server) -> None:
    assert_envelope(post(gateway, STATIC_A, "/v1/completions", {
        "model": "fake-model", "prompt": "hi", "best_of": 10_000}), 400, param="best_of")
    assert_envelope(post(gateway, STATIC_A, "/v1/chat/completions",
                         ask("relay-model", "hi", best_of=10_000)), 400, param="best_of")
    secret = make_key(gateway, name="best-of-counted", max_parallel=2)["secret"]
    for path, body in (("/v1/completions", {"model": "fake-model", "prompt": "hi",
                                            "best_of": 3}),
                       ("/v1/chat/completions", ask("relay-model", "hi", best_of=3))):
        refused = post(gateway, secret, path, body)
        assert_envelope(refused, 429, "rate_limit_exceeded")
        assert refused.headers["x-should-retry"] == "false"


def test_tokens_and_parallel_requests_count_max_tokens_and_n(gateway: Server) -> None:
    made = make_key(gateway, name="n-counted", tpm=500, max_parallel=2)
    too_many = post(gateway, made["secret"], "/v1/chat/completions",
                    ask("fake-model", "hi", n=3))
    error = assert_envelope(too_many, 429, "rate_limit_exceeded")
    assert "3" in error["message"] and too_many.headers["x-should-retry"] == "false"
    too_long = post(gateway, made["secret"], "/v1/chat/completions",
                    ask("fake-model", "hi", max_tokens=300, n=2))
    error = assert_envelope(too_long, 429, "rate_limit_exceeded")
    assert error["type"] == "tokens" and too_long.headers["x-should-retry"] == "false"
    fits = post(gateway, made["secret"], "/v1/chat/completions",
                ask("fake-model", "hi", max_tokens=50, n=2))
    assert fits.status_code == 200 and len(fits.json()["choices"]) == 2
    assert int(fits.headers["x-ratelimit-remaining-tokens"]) < 500


# ---- 3. bounded storage ----------------------------------------------------------------

def test_stored_responses_are_bounded(gateway: Server) -> None:
    made = make_key(gateway, name="hoarder")
    secret = made["secret"]
    huge_user = post(gateway, secret, "/v1/responses",
                     {"model": "fake-model", "input": "hi", "user": "u" * (8 << 20)})
    assert_envelope(huge_user, 400, param="user")
    big = "x" * (MAX_STORED_BYTES + 1000)
    answered = post(gateway, secret, "/v1/responses", {"model": "fake-model", "input": big})
    assert answered.status_code == 200 and answered.json()["store"] is False
    assert_envelope(requests.get(f"{gateway.url}/v1/responses/{answered.json()['id']}",
                                 headers={"Authorization": f"Bearer {secret}"}, timeout=10),
                    404)
    refused = post(gateway, secret, "/v1/responses",
                   {"model": "fake-model", "input": big, "store": True})
    assert_envelope(refused, 400, param="store")
    # Past its quota, a key loses its oldest responses, and no other key's.
    other = post(gateway, STATIC_A, "/v1/responses", {"model": "fake-model", "input": "mine"})
    ids = []
    for number in range(6):
        stored = post(gateway, secret, "/v1/responses",
                      {"model": "fake-model", "input": f"{number}" + "y" * 20_000})
        assert stored.status_code == 200 and stored.json()["store"] is True
        ids.append(stored.json()["id"])

    def status(key: str, response_id: str) -> int:
        return requests.get(f"{gateway.url}/v1/responses/{response_id}", timeout=10,
                            headers={"Authorization": f"Bearer {key}"}).status_code
    wait_for(lambda: status(secret, ids[0]) == 404, 10, "the oldest to be evicted")
    assert status(secret, ids[-1]) == 200
    assert status(STATIC_A, other.json()["id"]) == 200


def test_a_key_keeps_at_most_so_many_responses(tmp_path: Any) -> None:
    """In process, against an SQLite file: past its count, a key loses its oldest, and
    no other key's."""
    from app.access.database import engine_for, upgrade
    from app.responses.store import ResponseNotFound, ResponseStore

    url = f"sqlite:///{tmp_path}/store.db"
    upgrade(url)
    engine = engine_for(url)
    store = ResponseStore(engine, 3600, max_stored=100, owner_max=3)
    store.save({"id": "resp_b", "model": "m", "output": []}, "key_b", [], [])
    for number in range(5):
        store.save({"id": f"resp_{number}", "model": "m", "output": []}, "key_a", [], [])
        store.flush()
    for number in (0, 1):
        with pytest.raises(ResponseNotFound):
            store.get(f"resp_{number}", "key_a")
    assert [store.get(f"resp_{n}", "key_a")["id"] for n in (2, 3, 4)] == \
        ["resp_2", "resp_3", "resp_4"]
    assert store.get("resp_b", "key_b")["id"] == "resp_b"
    engine.dispose()


def test_reading_stored_responses_counts_toward_rpm(gateway: Server) -> None:
    secret = make_key(gateway, name="reader", rpm=4, max_parallel=1)["secret"]
    made = post(gateway, secret, "/v1/responses", {"model": "fake-model", "input": "hi"})
    assert made.status_code == 200
    url = f"{gateway.url}/v1/responses/{made.json()['id']}"
    auth = {"Authorization": f"Bearer {secret}"}
    # Reading holds no parallel slot, and is not refused for one: only rpm counts it.
    with post(gateway, secret, "/v1/chat/completions", ask(
            "fake-model", "[[count:10]][[slow:0.2]]", stream=True), stream=True) as held:
        assert held.status_code == 200
        assert requests.get(url, headers=auth, timeout=10).status_code == 200
        held.content
    assert requests.get(url + "/input_items", headers=auth, timeout=10).status_code == 200
    assert_envelope(requests.get(url, headers=auth, timeout=10), 429, "rate_limit_exceeded")


@pytest.mark.parametrize("path,body,param", [
    ("/v1/responses", {"model": "fake-model", "input": "hi", "user": "u" * 257}, "user"),
    ("/v1/responses", {"model": "fake-model", "input": "hi", "safety_identifier": "s" * 65},
     "safety_identifier"),
    ("/v1/responses", {"model": "fake-model", "input": "hi", "prompt_cache_key": "k" * 65},
     "prompt_cache_key"),
    ("/v1/chat/completions", ask("fake-model", "hi", n=3, best_of=2), "best_of"),
    ("/v1/completions", {"model": "fake-model", "prompt": "hi", "best_of": 0}, "best_of"),
])
def test_bounded_fields_are_400_naming_them(gateway: Server, path: str, body: dict[str, Any],
                                            param: str) -> None:
    assert_envelope(post(gateway, STATIC_A, path, body), 400, param=param)


# ---- 4. every key owns what it stores --------------------------------------------------

def test_static_keys_do_not_see_each_others_stored_responses(gateway: Server) -> None:
    mine = post(gateway, STATIC_A, "/v1/responses",
                {"model": "fake-model", "input": "a secret of alpha"})
    assert mine.status_code == 200
    response_id = mine.json()["id"]
    theirs = {"Authorization": f"Bearer {STATIC_B}"}
    base = f"{gateway.url}/v1/responses/{response_id}"
    assert_envelope(requests.get(base, headers=theirs, timeout=10), 404)
    assert_envelope(requests.get(base + "/input_items", headers=theirs, timeout=10), 404)
    assert_envelope(requests.delete(base, headers=theirs, timeout=10), 404)
    follow_up = post(gateway, STATIC_B, "/v1/responses", {
        "model": "fake-model", "input": "and?", "previous_response_id": response_id})
    assert_envelope(follow_up, 404, param="previous_response_id")
    own = requests.get(base, headers={"Authorization": f"Bearer {STATIC_A}"}, timeout=10)
    assert own.status_code == 200 and own.json()["id"] == response_id


# ---- 5. errors name only what the caller may see ---------------------------------------

def test_a_404_lists_only_the_models_the_key_may_use(gateway: Server) -> None:
    secret = make_key(gateway, name="narrow", models=["fake-model", "ghost-model"])["secret"]
    refused = [
        post(gateway, secret, "/v1/chat/completions", ask("ghost-model", "hi")),
        post(gateway, secret, "/api/v1/token_check", {"prompts": [
            {"model": "ghost-model", "prompt": "a", "max_tokens": 1}]}),
        post(gateway, secret, "/demo/streams", ask("ghost-model", "hi")),
    ]
    for response in refused:
        error = assert_envelope(response, 404, "model_not_found")
        assert "fake-model" in error["message"], error
        assert "secret-model" not in error["message"] and "progress" not in error["message"]
    everything = post(gateway, STATIC_A, "/v1/chat/completions", ask("ghost-model", "hi"))
    assert "secret-model" in assert_envelope(everything, 404)["message"]


# ---- 6. demo tickets -------------------------------------------------------------------

def test_demo_tickets_count_against_rpm_and_are_capped(gateway: Server) -> None:
    secret = make_key(gateway, name="demo-user", rpm=1)["secret"]
    first = post(gateway, secret, "/demo/streams", ask("fake-model", "hi"))
    assert first.status_code == 201, first.text
    again = post(gateway, secret, "/demo/streams", ask("fake-model", "hi"))
    assert_envelope(again, 429, "rate_limit_exceeded")
    # Its one request was the ticket: the stream it opens is not refused for rpm.
    stream = requests.get(f"{gateway.url}/{first.json()['url']}", timeout=30)
    assert stream.status_code == 200 and b"data: [DONE]" in stream.content
    assert b'"error"' not in stream.content
    huge = post(gateway, STATIC_A, "/demo/streams", ask("fake-model", "z" * (1536 << 10)))
    assert_envelope(huge, 413)


def test_demo_ticket_storage_is_bounded(tmp_path: Any) -> None:
    from app.demo.tickets import TicketStore
    from app.errors import Overloaded

    clock = [1000.0]
    store = TicketStore(str(tmp_path), ttl=30, clock=lambda: clock[0], max_waiting=3,
                        max_per_owner=2)
    made = [store.issue({"model": "m"}, f"req-{n}", None, "key_a") for n in range(2)]
    with pytest.raises(Overloaded):  # key_a's two are waiting
        store.issue({"model": "m"}, "req-2", None, "key_a")
    store.issue({"model": "m"}, "req-3", None, "key_b")
    with pytest.raises(Overloaded):  # three in all
        store.issue({"model": "m"}, "req-4", None, "key_c")
    assert store.redeem(made[0]) is not None  # one redeemed: room for one more
    store.issue({"model": "m"}, "req-5", None, "key_a")
    clock[0] += 31  # unredeemed ones expire and are swept
    for path in tmp_path.iterdir():
        os.utime(path, (clock[0] - 31, clock[0] - 31))
    store.issue({"model": "m"}, "req-6", None, "key_c")
    assert len(list(tmp_path.iterdir())) == 1


# ---- 7. operator endpoints -------------------------------------------------------------

def test_verbose_health_and_metrics_need_an_admin_key(gateway: Server) -> None:
    plain = requests.get(gateway.url + "/health", timeout=10)
    assert plain.status_code == 200 and plain.json()["status"] == "ok"
    assert_envelope(requests.get(gateway.url + "/health?verbose=1", timeout=10), 401)
    assert_envelope(requests.get(gateway.url + "/health?verbose=1", timeout=10,
                                 headers={"Authorization": f"Bearer {STATIC_A}"}), 403)
    verbose = requests.get(gateway.url + "/health?verbose=1", timeout=10,
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert verbose.status_code == 200 and "greenlets" in verbose.json()
    # The gevent worker froze its start-up objects (app.runtime.collector)
    assert verbose.json()["collector"]["frozen_objects"] > 10_000
    assert_envelope(requests.get(gateway.url + "/metrics", timeout=10), 401)
    scraped = requests.get(gateway.url + "/metrics", timeout=10,
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert scraped.status_code == 200 and "flaskchat_requests_total" in scraped.text


# ---- 8. a chunked body is estimated from the bytes read ---------------------------------

def test_a_chunked_body_is_counted_as_one_with_a_length(gateway: Server) -> None:
    secret = make_key(gateway, name="chunky", tpm=100)["secret"]
    body = json.dumps(ask("fake-model", "word " * 200)).encode()
    sized = requests.post(gateway.url + "/v1/chat/completions", data=body, timeout=30,
                          headers={"Authorization": f"Bearer {secret}",
                                   "Content-Type": "application/json"})
    assert_envelope(sized, 429, "rate_limit_exceeded")
    host, port = gateway.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", "/v1/chat/completions", body=iter([body[:300], body[300:]]),
                       headers={"Authorization": f"Bearer {secret}",
                                "Content-Type": "application/json"}, encode_chunked=True)
    chunked = connection.getresponse()
    payload = json.loads(chunked.read())
    connection.close()
    assert chunked.status == 429 and payload["error"]["code"] == "rate_limit_exceeded"
    assert admin(gateway, "GET", "/keys/chunky").status_code == 200


# ---- also found ------------------------------------------------------------------------

def test_no_upstream_address_reaches_a_client(gateway: Server,
                                              servers: dict[str, Server]) -> None:
    """Failures of an OpenAI-compatible upstream, before and after the first byte, and
    of one that is down: their messages say "the upstream server", never where it is."""
    hidden = [servers["relay"].url.removeprefix("http://"), "127.0.0.1", "nxhost"]
    answers = [
        post(gateway, STATIC_A, "/v1/chat/completions", ask("relay-model", "[[http:500]]")),
        post(gateway, STATIC_A, "/v1/chat/completions", ask("relay-model", "[[http:401]]")),
        post(gateway, STATIC_A, "/v1/chat/completions", ask("dead-model", "hi")),
        post(gateway, STATIC_A, "/v1/chat/completions", ask("lost-model", "hi")),
        post(gateway, STATIC_A, "/v1/chat/completions",
             ask("relay-model", "[[drop]]", stream=True)),
        post(gateway, STATIC_A, "/v1/chat/completions",
             ask("relay-model", "[[error]]", stream=True)),
        post(gateway, STATIC_A, "/v1/chat/completions",
             ask("relay-model", "[[nodone]]", stream=True)),
    ]
    for answer in answers[:4]:
        assert answer.status_code >= 500 and "upstream server" in answer.text, answer.text
    for answer in answers[4:]:
        assert answer.status_code == 200 and b'"error"' in answer.content, answer.text
    for answer in answers:
        for secret in hidden:
            assert secret not in answer.text, answer.text


def test_require_auth_refuses_everyone_until_a_key_exists(servers: dict[str, Server]) -> None:
    url = new_database_url()
    with tempfile.TemporaryFile() as log:
        open_server = start_gateway(servers["controller"].url, "--workers", "1", stderr=log,
                                    env={"FLASKCHAT_DATABASE_URL": url})
        try:
            assert post(open_server, "", "/v1/chat/completions",
                        ask("fake-model", "hi")).status_code == 200
        finally:
            open_server.stop()
        log.seek(0)
        warned = log.read().decode()
    # Auth is off with an empty key database: said at start, naming the database.
    assert "auth is off" in warned and url.removeprefix("sqlite:///") in warned
    closed = start_gateway(servers["controller"].url, "--workers", "1", "--require-auth",
                           env={"FLASKCHAT_DATABASE_URL": url})
    try:
        for key in ("", "made-up-key"):
            assert_envelope(post(closed, key, "/v1/chat/completions",
                                 ask("fake-model", "hi")), 401, "invalid_api_key")
        assert_envelope(requests.get(closed.url + "/v1/models", timeout=10), 401)
        assert requests.get(closed.url + "/health", timeout=10).status_code == 200
    finally:
        closed.stop()

"""Several gateway hosts sharing one PostgreSQL and one Redis, all real: two gunicorn
masters with two processes each. Limits hold across all four processes, a key revoked on
one host is refused on the other within seconds, usage adds up exactly, and a database
that goes away stops neither serving nor accounting."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import pytest
import requests
from sqlalchemy import create_engine, func, select

from app.access.tables import usage
from tests.conftest import ROOT, Server, Stack, start_gateway, wait_for
from tests.databases import Postgres, Redis, as_database_user, postgres, redis_server
from tests.test_keys import ADMIN_KEY, admin, assert_envelope, cli, make_key
from tests.nginx import free_port

SHARED = {"FLASKCHAT_KEYS_REFRESH": "1", "FLASKCHAT_USAGE_FLUSH_INTERVAL": "0.3",
          "FLASKCHAT_ADMIN_KEYS": ADMIN_KEY}


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    with postgres() as server:
        yield server


@pytest.fixture(scope="module")
def redis() -> Iterator[Redis]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def hosts(stack: Stack, pg: Postgres, redis: Redis) -> Iterator[list[Server]]:
    upgraded = cli("db", "upgrade", "--database-url", pg.url)
    assert upgraded.returncode == 0, upgraded.stderr
    env = {**SHARED, "FLASKCHAT_DATABASE_URL": pg.url, "FLASKCHAT_REDIS_URL": redis.url}
    started = []
    try:
        for _ in range(2):
            started.append(start_gateway(stack.controller.url, "--workers", "2", env=env))
        # The first key turns auth on everywhere within a refresh.
        make_key(started[0], name="first-key")
        for host in started:
            wait_for(lambda: all(fresh_chat(host, "") == 401 for _ in range(4)), 5,
                     "auth to be on")
        yield started
    finally:
        for server in started:
            server.stop()


def rows_for(pg: Postgres, key_id: str) -> int:
    engine = create_engine(pg.url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(usage)
                                          .where(usage.c.key_id == key_id)).scalar_one())
    finally:
        engine.dispose()


def fresh_chat(host: Server, key: str, **extra: Any) -> int:
    """On a new connection each time, so that the kernel hands it to either process."""
    with requests.Session() as session:
        return session.post(host.url + "/v1/chat/completions", timeout=30,
                            headers={"Authorization": f"Bearer {key}",
                                     "Connection": "close"},
                            json={"model": "fake-model",
                                  "messages": [{"role": "user", "content": "hi"}], **extra}
                            ).status_code


def test_an_unupgraded_postgres_stops_the_server_with_what_to_run(pg: Postgres) -> None:
    """A PostgreSQL shared by hosts is upgraded on purpose, not by whichever host starts
    first; the message says how."""
    create = subprocess.run(as_database_user([str(pg.bin_dir / "createdb"), "-h",
                                              "127.0.0.1", "-p", str(pg.port), "empty"]),
                            capture_output=True, text=True)
    assert create.returncode == 0, create.stderr
    empty = pg.url.rsplit("/", 1)[0] + "/empty"
    started = cli("serve", "--port", str(free_port()), "--database-url", empty, timeout=90)
    assert started.returncode == 2 and "flaskchat db upgrade" in started.stderr, \
        started.stderr


def test_rpm_holds_at_exactly_the_limit_across_four_processes(hosts: list[Server]) -> None:
    secret = make_key(hosts[0], name="rpm-ten", rpm=10)["secret"]
    statuses: list[int] = []
    lock = threading.Lock()

    def send(host: Server) -> None:
        for _ in range(8):
            status = fresh_chat(host, secret)
            with lock:
                statuses.append(status)
    threads = [threading.Thread(target=send, args=(hosts[i % 2],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(statuses) == 32
    assert statuses.count(200) == 10 and statuses.count(429) == 22, statuses


def test_a_key_revoked_on_one_host_is_refused_on_the_other(hosts: list[Server]) -> None:
    made = make_key(hosts[0], name="revoked-across")
    assert fresh_chat(hosts[1], made["secret"]) == 200
    assert admin(hosts[0], "DELETE", f"/keys/{made['id']}").status_code == 200
    # Refused by both processes of the other host within 5 s.
    wait_for(lambda: all(fresh_chat(hosts[1], made["secret"]) == 401 for _ in range(4)), 5,
             "host B to refuse the revoked key")


def test_usage_from_both_hosts_adds_up_exactly(hosts: list[Server], pg: Postgres) -> None:
    made = make_key(hosts[0], name="counted-across", team="platform")
    sent = 0
    for i in range(40):
        assert fresh_chat(hosts[i % 2], made["secret"], stream=i % 3 == 0) == 200
        sent += 1
    wait_for(lambda: rows_for(pg, made["id"]) >= sent, 15, "every usage record")
    # None doubled either: still exactly as many after more flushes.
    time.sleep(1)
    assert rows_for(pg, made["id"]) == sent
    report = admin(hosts[1], "GET", "/usage?group_by=team&since=1h").json()["data"]
    assert {row["team"]: row["requests"] for row in report}["platform"] == sent
    # The per-day sums (what budgets and the admin chart read) agree with the rows.
    daily = admin(hosts[1], "GET", "/usage/daily?days=2").json()["teams"]["platform"]
    assert sum(daily) == sum(row["total_tokens"] for row in report
                             if row["team"] == "platform")


def test_postgres_going_away_keeps_cached_keys_serving(hosts: list[Server],
                                                       pg: Postgres) -> None:
    made = make_key(hosts[0], name="survives-outage")
    secret = made["secret"]
    warm = 0
    for host in hosts:
        for _ in range(6):
            assert fresh_chat(host, secret) == 200
            warm += 1
    wait_for(lambda: rows_for(pg, made["id"]) == warm, 10, "the warm-up records")
    # The kernel need not have handed a warm-up request to every process; each process's
    # own refresh (every 1 s here) loads the new key. Two of them, and every process
    # knows it: nothing outside the process shows that, so this waits them out.
    time.sleep(2.5)
    pg.stop()
    try:
        served = 0
        for i in range(12):
            assert fresh_chat(hosts[i % 2], secret) == 200
            served += 1
        # A key nobody has seen cannot be checked now: refused, never let in.
        unknown = requests.post(hosts[0].url + "/v1/chat/completions", timeout=30,
                                headers={"Authorization": "Bearer fc-never-seen-key"},
                                json={"model": "fake-model",
                                      "messages": [{"role": "user", "content": "hi"}]})
        assert_envelope(unknown, 503)
        assert_envelope(admin(hosts[1], "GET", "/keys"), 503)
        metrics = requests.get(hosts[0].url + "/metrics", timeout=10).text
        assert "flaskchat_usage_buffered_records" in metrics
    finally:
        pg.start()
    # The buffered records are written once it is back (an unknown key's 503 included).
    wait_for(lambda: rows_for(pg, made["id"]) == warm + served, 20,
             "the buffered usage records")


def test_concurrent_creates_of_one_name_on_postgres(pg: Postgres) -> None:
    runs = [subprocess.Popen([sys.executable, "-m", "app.cli", "keys", "create", "--name",
                              "same-pg", "--json", "--database-url", pg.url], cwd=ROOT,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(4)]
    results = [(run.wait(60), *run.communicate()) for run in runs]
    assert sorted(code for code, _, _ in results) == [0, 2, 2, 2], results
    listed = json.loads(cli("keys", "list", "--json", "--database-url", pg.url).stdout)
    assert [key["name"] for key in listed].count("same-pg") == 1


def test_a_stored_response_continues_on_the_other_host(hosts: list[Server]) -> None:
    """Responses stored in PostgreSQL: a conversation started on host A goes on on host B,
    asked at once. The first reply takes over a second (a response is saved when it ends,
    long after its id was made: host B must not judge by the id's time)."""
    headers = {"Authorization": f"Bearer {make_key(hosts[0], name='responder')['secret']}"}
    first = requests.post(hosts[0].url + "/v1/responses", headers=headers, timeout=30,
                          json={"model": "fake-model",
                                "input": "[[slow:0.7]][[reply:first answer]]"})
    assert first.status_code == 200, first.text
    response_id = first.json()["id"]
    again = requests.get(f"{hosts[1].url}/v1/responses/{response_id}", headers=headers,
                         timeout=30)
    assert again.status_code == 200 and again.json()["output"][0]["content"][0]["text"] == \
        "first answer"
    follow_up = requests.post(hosts[1].url + "/v1/responses", headers=headers, timeout=30,
                              json={"model": "fake-model", "input": "and then?",
                                    "previous_response_id": response_id})
    assert follow_up.status_code == 200, follow_up.text
    assert follow_up.json()["previous_response_id"] == response_id


def test_a_budget_holds_across_hosts_and_processes(hosts: list[Server], pg: Postgres) -> None:
    """Reservations in Redis: 16 concurrent n=2 requests over two hosts of two processes
    each against a 40-token budget spend at most one reservation past it."""
    made = make_key(hosts[0], name="shared-budget", budget_tokens=40, budget_period="day")
    statuses: list[int] = []
    lock = threading.Lock()

    def send(host: Server) -> None:
        status = fresh_chat(host, made["secret"], n=2,
                            messages=[{"role": "user", "content": "[[count:50]]"}])
        with lock:
            statuses.append(status)
    threads = [threading.Thread(target=send, args=(hosts[i % 2],)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(set(statuses)) == [200, 429], statuses
    wait_for(lambda: rows_for(pg, made["id"]) == 16, 20, "every usage record")
    engine = create_engine(pg.url)
    with engine.connect() as connection:
        spent = connection.execute(select(func.sum(usage.c.prompt_tokens
                                                   + usage.c.completion_tokens))
                                   .where(usage.c.key_id == made["id"])).scalar_one()
    engine.dispose()
    assert 0 < spent <= 40 + 40

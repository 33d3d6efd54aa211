"""What the ledger and the stored responses survive, against a real PostgreSQL 15 (and an
SQLite file): a row the database rejects, a database that is down when the gateway
stops, a schema one additive migration ahead (a rolling deploy), and rows older than the
retention window (kept as per-day sums)."""
from __future__ import annotations

import json
import signal
from datetime import timedelta
from typing import Any, Iterator

import pytest
import requests
from sqlalchemy import create_engine, func, insert, select, text, update

from app.access.database import HEAD, engine_for, upgrade
from app.access.keys import now
from app.access.tables import api_keys, responses, schema_releases, usage, usage_daily
from app.access.usage import UsageLedger, UsageRecord
from tests.conftest import (Stack, new_database_url, start_fake_worker,
                            start_gateway, wait_for)
from tests.databases import Postgres, postgres
from tests.test_keys import ADMIN_KEY, FAST, admin, cli, make_key

STATIC = "storage-static-key-4b1d"


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    with postgres() as server:
        upgraded = cli("db", "upgrade", "--database-url", server.url)
        assert upgraded.returncode == 0, upgraded.stderr
        yield server


def count(url: str, table: Any, *where: Any) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(table)
                                          .where(*where)).scalar_one())
    finally:
        engine.dispose()


def record(request_id: str, **changes: Any) -> UsageRecord:
    fields: dict[str, Any] = dict(
        created_at=now(), key_id="key_ledger", key_name="ledger", team="t", model="m",
        route="/v1/chat/completions", status=200, prompt_tokens=3, completion_tokens=4,
        latency_ms=5.0, ttft_ms=None, request_id=request_id)
    fields.update(changes)
    return UsageRecord(**fields)


class Observer:
    def __init__(self) -> None:
        self.rejected_records = 0

    def buffered(self, records: int) -> None:
        pass

    def dropped(self, records: int) -> None:
        pass

    def rejected(self, records: int) -> None:
        self.rejected_records += records


# ---- a row the database rejects ---------------------------------------------------------

def test_a_rejected_usage_row_is_isolated_and_the_rest_written(pg: Postgres) -> None:
    observer = Observer()
    engine = engine_for(pg.url)
    ledger = UsageLedger(engine, observer=observer)
    for number in range(5):
        ledger.add(record(f"isolate-{number}"))
    ledger.add(record("isolate-bad", route=None))  # NOT NULL: PostgreSQL refuses it
    # Out of any column's range or length, or with a NUL: clamped, not rejected.
    ledger.add(record("isolate-clamped", completion_tokens=3 * 2**31, model="m" * 300,
                      key_name="a\0b"))
    assert ledger.flush()
    assert count(pg.url, usage, usage.c.request_id.like("isolate-%")) == 6
    assert observer.rejected_records == 1 and ledger.buffered == 0
    with engine.connect() as connection:
        clamped = connection.execute(select(usage).where(
            usage.c.request_id == "isolate-clamped")).mappings().one()
    assert clamped["completion_tokens"] == 2**31 - 1 and len(clamped["model"]) == 200
    # The next batch goes in as usual.
    ledger.add(record("isolate-after"))
    assert ledger.flush() and count(pg.url, usage, usage.c.request_id == "isolate-after")
    engine.dispose()


def test_a_model_name_longer_than_its_column_does_not_stop_the_ledger(
        stack: Stack, pg: Postgres) -> None:
    long_name = "long-" + "n" * 295
    worker = start_fake_worker(stack.controller.url, "--models", long_name,
                               "--capabilities", "length_check,messages")
    gateway = start_gateway(stack.controller.url, "--workers", "1",
                            env={**FAST, "FLASKCHAT_DATABASE_URL": pg.url})
    try:
        key = make_key(gateway, name="long-model-user")

        def chat(model: str) -> int:
            return requests.post(gateway.url + "/v1/chat/completions", timeout=30,
                                 headers={"Authorization": f"Bearer {key['secret']}"},
                                 json={"model": model, "messages": [
                                     {"role": "user", "content": "hi"}]}).status_code
        wait_for(lambda: chat(long_name) == 200, 10, "the long-named model")
        assert chat("fake-model") == 200
        wait_for(lambda: count(pg.url, usage, usage.c.key_id == key["id"]) >= 2, 10,
                 "both records")
        assert count(pg.url, usage, usage.c.model == long_name[:200]) >= 1
    finally:
        gateway.stop()
        worker.stop()


# ---- a database that is down when the gateway stops ------------------------------------

def test_stored_responses_wait_for_the_database_through_a_stop(stack: Stack,
                                                               pg: Postgres) -> None:
    gateway = start_gateway(stack.controller.url, "--workers", "1", "--api-keys", STATIC,
                            env={**FAST, "FLASKCHAT_DATABASE_URL": pg.url,
                                 "FLASKCHAT_DRAIN_SECONDS": "0.5"})
    stopped = False
    try:
        pg.stop()
        ids = []
        for number in range(3):
            reply = requests.post(gateway.url + "/v1/responses", timeout=30,
                                  headers={"Authorization": f"Bearer {STATIC}"},
                                  json={"model": "fake-model", "input": f"kept {number}"})
            assert reply.status_code == 200, reply.text
            ids.append(reply.json()["id"])
        gateway.process.send_signal(signal.SIGTERM)
        pg.start()  # within the stop's retries
        gateway.process.wait(60)
        stopped = True
    finally:
        if pg.process is None:
            pg.start()
        if not stopped:
            gateway.stop()
    assert count(pg.url, responses, responses.c.id.in_(ids)) == 3


# ---- a rolling deploy --------------------------------------------------------------------

def test_a_release_starts_on_a_schema_one_additive_migration_ahead(
        stack: Stack, pg: Postgres) -> None:
    """The next release's migration (here a stand-in, 0005, adding a column) says this
    release can still run on it: hosts not yet upgraded keep serving, and writing."""
    database = pg.url.rsplit("/", 1)[0] + "/ahead"
    assert cli("db", "upgrade", "--database-url", pg.url).returncode == 0
    engine = create_engine(pg.url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text("DROP DATABASE IF EXISTS ahead"))
        connection.execute(text("CREATE DATABASE ahead"))
    engine.dispose()
    assert cli("db", "upgrade", "--database-url", database).returncode == 0
    ahead = create_engine(database)
    with ahead.begin() as connection:  # what a migration 0005 would do
        connection.execute(text("ALTER TABLE usage ADD COLUMN region VARCHAR(20)"))
        connection.execute(insert(schema_releases).values(revision="0005",
                                                          oldest_release=HEAD))
        connection.execute(text("UPDATE alembic_version SET version_num = '0005'"))
    checked = cli("db", "check", "--database-url", database)
    assert checked.returncode == 0, checked.stderr
    gateway = start_gateway(stack.controller.url, "--workers", "1",
                            env={**FAST, "FLASKCHAT_DATABASE_URL": database})
    try:
        key = make_key(gateway, name="on-a-newer-schema")
        reply = requests.post(gateway.url + "/v1/chat/completions", timeout=30,
                              headers={"Authorization": f"Bearer {key['secret']}"},
                              json={"model": "fake-model",
                                    "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200
        wait_for(lambda: count(database, usage, usage.c.key_id == key["id"]) == 1, 10,
                 "the usage record")
    finally:
        gateway.stop()
    # A migration that is not additive says so: this release then refuses to start.
    with ahead.begin() as connection:
        connection.execute(update(schema_releases).where(schema_releases.c.revision ==
                                                         "0005").values(oldest_release="0005"))
    ahead.dispose()
    refused = cli("db", "check", "--database-url", database)
    assert refused.returncode == 2 and "newer" in refused.stderr, refused.stderr


def test_the_previous_release_writes_fit_the_new_schema(pg: Postgres) -> None:
    """What a release at 0002 writes (no errors, latency or key name per day; no size per
    stored response), or at 0003 (no key's weight or tiers), goes into this schema: the
    new columns have defaults."""
    engine = create_engine(pg.url)
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO usage_daily (day, key_id, model, team, requests, prompt_tokens, "
            "completion_tokens) VALUES ('2020-01-01', 'key_old', 'm', NULL, 1, 2, 3)"))
        connection.execute(text(
            "INSERT INTO responses (id, owner, model, created_at, expires_at, input_items, "
            "context, response) VALUES ('resp_old', '', 'm', now(), now(), '[]', '[]', "
            "'{}')"))
        connection.execute(text(
            "INSERT INTO api_keys (id, name, secret_hash, hint, created_at, updated_at) "
            "VALUES ('key_old', 'made-by-0003', :hash, 'fc-...old1', now(), now())"),
            {"hash": "0" * 64})
        row = connection.execute(select(usage_daily.c.errors, usage_daily.c.latency_ms)
                                 .where(usage_daily.c.key_id == "key_old")).one()
        share = connection.execute(select(api_keys.c.weight, api_keys.c.max_tier,
                                          api_keys.c.default_tier)
                                   .where(api_keys.c.id == "key_old")).one()
    engine.dispose()
    assert tuple(row) == (0, 0.0)
    assert tuple(share) == (1.0, "default", None)


# ---- retention -----------------------------------------------------------------------------

def test_old_usage_rows_are_pruned_and_their_days_still_reported(stack: Stack) -> None:
    url = new_database_url()
    upgrade(url)
    engine = engine_for(url)
    ledger = UsageLedger(engine)
    old = now() - timedelta(days=40)
    for number in range(30):
        ledger.add(record(f"old-{number}", created_at=old, key_id="key_old",
                          key_name="old-timer", status=500 if number == 0 else 200))
    ledger.add(record("recent", key_id="key_old", key_name="old-timer"))
    assert ledger.flush()
    engine.dispose()
    gateway = start_gateway(stack.controller.url, "--workers", "1",
                            env={**FAST, "FLASKCHAT_DATABASE_URL": url,
                                 "FLASKCHAT_USAGE_RETENTION": "7d"})
    try:
        wait_for(lambda: count(url, usage, usage.c.request_id.like("old-%")) == 0, 20,
                 "the old rows to be pruned")
        assert count(url, usage, usage.c.request_id == "recent") == 1
        report = admin(gateway, "GET", "/usage?group_by=key&since=60d").json()
        (row,) = [r for r in report["data"] if r["key_id"] == "key_old"]
        assert (row["requests"], row["errors"], row["total_tokens"]) == (31, 1, 31 * 7)
        assert row["key"] == "old-timer" and row["mean_latency_ms"] == 5.0
        recent = admin(gateway, "GET", "/usage?group_by=key&since=1d").json()["data"]
        assert [r["requests"] for r in recent if r["key_id"] == "key_old"] == [1]
    finally:
        gateway.stop()
    shown = cli("usage", "--by", "day", "--since", "60d", "--json", "--database-url", url)
    assert shown.returncode == 0, shown.stderr
    days = {row["day"]: row["requests"] for row in json.loads(shown.stdout)["data"]}
    assert days[old.strftime("%Y-%m-%d")] == 30
    assert ADMIN_KEY not in shown.stdout

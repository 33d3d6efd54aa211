"""Fair sharing of a busy model, against real processes: a controller, fake workers with a
FIFO concurrency limit like FastChat's (one reports it as flaskchat's worker does, one
does not), one gateway under gunicorn with keys in SQLite. Latency and shares are
measured by the clients and the worker's own counters; the bounds are the issue's, and
loose enough for a slow shared machine (the ratios, not the times, are asserted)."""
from __future__ import annotations

import socket
import statistics
import threading
import time
from typing import Any, Iterator

import openai
import pytest
import requests

from tests.conftest import Server, new_database_url, start_controller, start_fake_worker, \
    start_gateway, wait_for
from tests.databases import redis_server
from tests.test_keys import FAST, admin, make_key

CAPACITY = 2
REPLY = 16  # tokens a reply has
TOKEN_DELAY = 0.02  # seconds a token takes: a reply takes ~0.32 s


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Server]]:
    started: dict[str, Server] = {}
    limit = ["--limit-worker-concurrency", str(CAPACITY), "--delay", str(TOKEN_DELAY)]
    try:
        started["controller"] = start_controller()
        url = started["controller"].url
        started["shared"] = start_fake_worker(url, "--models", "shared", *limit,
                                              "--report-capacity")
        started["stock"] = start_fake_worker(url, "--models", "stock", *limit)
        started["capped"] = start_fake_worker(url, "--models", "capped", *limit)
        started["fleet"] = start_fake_worker(url, "--models", "fleet", *limit,
                                             "--report-capacity")
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
        servers["controller"].url, "--workers", "1", "--model-capacity", "capped=2",
        env={**FAST, "FLASKCHAT_DATABASE_URL": database_url,
             "FLASKCHAT_FLEX_QUEUE_TIMEOUT": "1.5", "FLASKCHAT_MAX_WAITING_PER_TEAM": "20",
             "FLASKCHAT_LOG_LEVEL": "warning"})
    wait_for(lambda: requests.get(server.url + "/ready", timeout=5).status_code == 200,
             what="the gateway to see the workers")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keys(gateway: Server) -> dict[str, str]:
    made = {}
    teams: dict[str, dict[str, Any]] = {
        "heavy": {"team": "heavy"}, "light": {"team": "light"},
        "big": {"team": "big", "weight": 2}, "small": {"team": "small"},
        "batch": {"team": "batch", "max_tier": "flex"},
        "vip": {"team": "vip", "max_tier": "priority"}}
    for name, fields in teams.items():
        made[name] = make_key(gateway, name=name, **fields)["secret"]
    wait_for(lambda: chat(gateway, made["vip"], "shared").status_code == 200,
             what="the keys to be known")
    return made


def chat(gateway: Server, key: str, model: str = "shared", stream: bool = False,
         **extra: Any) -> requests.Response:
    return requests.post(gateway.url + "/v1/chat/completions", timeout=60, stream=stream,
                         headers={"Authorization": f"Bearer {key}"},
                         json={"model": model, "stream": stream, **extra, "messages": [
                             {"role": "user", "content": f"[[count:{REPLY}]]"}]})


def stats(server: Server, reset: bool = False) -> dict[str, Any]:
    if reset:
        requests.post(server.url + "/fake/reset", timeout=5)
    found: dict[str, Any] = requests.get(server.url + "/fake/stats", timeout=5).json()
    return found


class Loop:
    """``threads`` clients of one key sending requests back to back; counts what
    finished (and when), and what failed."""

    def __init__(self, gateway: Server, key: str, threads: int, stream: bool = True,
                 model: str = "shared", **extra: Any) -> None:
        self.done: list[float] = []
        self.failed: list[int] = []
        self._stop = threading.Event()
        # Replies of 13 to 19 tokens, as real ones vary: with all alike, the worker's two
        # slots would free up together, always just after a one-at-a-time client's turn.
        self._threads = [threading.Thread(target=self._run, args=(
            gateway, key, stream, model, extra, REPLY - 3 + index % 7))
            for index in range(threads)]

    def __enter__(self) -> "Loop":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, gateway: Server, key: str, stream: bool, model: str,
             extra: dict[str, Any], count: int) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                reply = session.post(
                    gateway.url + "/v1/chat/completions", timeout=60,
                    headers={"Authorization": f"Bearer {key}"},
                    json={"model": model, "stream": stream, **extra, "messages": [
                        {"role": "user", "content": f"[[count:{count}]]"}]})
                if reply.status_code == 200 and f"w{count - 1}" in reply.text:
                    self.done.append(time.monotonic())
                else:
                    self.failed.append(reply.status_code)

    def between(self, start: float, end: float) -> int:
        return sum(1 for at in self.done if start <= at < end)


def latencies(gateway: Server, key: str, count: int, model: str = "shared") -> list[float]:
    found = []
    for _ in range(count):
        began = time.monotonic()
        reply = chat(gateway, key, model)
        assert reply.status_code == 200, reply.text
        found.append(time.monotonic() - began)
    return found


def test_a_light_team_waits_little_behind_a_heavy_one_which_still_fills_the_worker(
        gateway: Server, servers: dict[str, Server], keys: dict[str, str]) -> None:
    solo = statistics.median(latencies(gateway, keys["light"], 5))
    with Loop(gateway, keys["heavy"], 16):
        wait_for(lambda: stats(servers["shared"])["running"] == CAPACITY, what="heavy's load")
        before, began = stats(servers["shared"])["busy"], time.monotonic()
        wait_for(lambda: time.monotonic() - began > 2.5, what="heavy alone a while")
        used = (stats(servers["shared"])["busy"] - before) / (
            (time.monotonic() - began) * CAPACITY)
        contended = statistics.median(latencies(gateway, keys["light"], 11))
        assert stats(servers["shared"])["peak"] <= CAPACITY
    print(f"\nlight alone {solo:.3f} s, behind heavy's 16 streams {contended:.3f} s "
          f"({contended / solo:.2f}x); heavy alone used {used:.0%} of the worker")
    assert contended <= 2 * solo
    assert used >= 0.85


@pytest.mark.parametrize("weights", [(1, 1), (2, 1)])
def test_backlogged_teams_share_the_worker_by_weight(
        gateway: Server, keys: dict[str, str], weights: tuple[int, int]) -> None:
    first, second = ("heavy", "light") if weights == (1, 1) else ("big", "small")
    with Loop(gateway, keys[first], 6) as one, Loop(gateway, keys[second], 6) as other:
        wait_for(lambda: len(one.done) + len(other.done) >= 10, 30, "both teams served")
        began = time.monotonic()
        wait_for(lambda: one.between(began, time.monotonic())
                 + other.between(began, time.monotonic()) >= 48, 60, "a measured window")
        ended = time.monotonic()
    share = one.between(began, ended) / max(other.between(began, ended), 1)
    print(f"\nweights {weights[0]}:{weights[1]}: served {one.between(began, ended)} and "
          f"{other.between(began, ended)} ({share:.2f})")
    assert weights[0] / weights[1] * 0.85 <= share <= weights[0] / weights[1] * 1.15
    assert not one.failed and not other.failed


def test_flex_waits_while_default_waits_and_gets_the_whole_worker_alone(
        gateway: Server, servers: dict[str, Server], keys: dict[str, str]) -> None:
    with Loop(gateway, keys["heavy"], 6):  # two running, four waiting at any moment
        wait_for(lambda: stats(servers["shared"])["running"] == CAPACITY, what="the load")
        began = time.monotonic()
        refused = chat(gateway, keys["batch"])
        waited = time.monotonic() - began
    # The flex request never got a slot: after --flex-queue-timeout, a 429.
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["Retry-After"]) >= 1
    assert waited >= 1.5
    stats(servers["shared"], reset=True)
    with Loop(gateway, keys["batch"], 4) as flex:
        wait_for(lambda: len(flex.done) >= 8, 30, "flex served alone")
    assert stats(servers["shared"])["peak"] == CAPACITY  # all of it
    assert not flex.failed


def test_the_tier_served_is_in_the_response_and_never_above_the_keys(
        gateway: Server, keys: dict[str, str], clients: Any) -> None:
    def tier(key: str, **asked: Any) -> str:
        reply = chat(gateway, key, **asked)
        assert reply.status_code == 200, reply.text
        served: str = reply.json()["service_tier"]
        return served
    assert tier(keys["light"]) == "default"
    assert tier(keys["light"], service_tier="priority") == "default"  # above the key's
    assert tier(keys["light"], service_tier="flex") == "flex"
    assert tier(keys["batch"]) == "flex"  # a batch key's default
    assert tier(keys["batch"], service_tier="auto") == "flex"
    assert tier(keys["vip"], service_tier="priority") == "priority"
    client: openai.OpenAI = clients(gateway.url + "/v1", api_key=keys["vip"])
    answer = client.completions.create(model="shared", prompt="[[count:3]]",
                                       extra_body={"service_tier": "priority"})
    assert getattr(answer, "service_tier", None) == "priority"
    chunks = list(client.chat.completions.create(
        model="shared", messages=[{"role": "user", "content": "hi"}], stream=True,
        service_tier="flex"))
    assert chunks and all(chunk.service_tier == "flex" for chunk in chunks)
    bad = chat(gateway, keys["light"], service_tier="gold")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "service_tier"


def test_a_client_that_leaves_while_waiting_is_never_sent(
        gateway: Server, servers: dict[str, Server], keys: dict[str, str]) -> None:
    slow = {"role": "user", "content": "[[count:60]]"}
    holders = [threading.Thread(target=requests.post, args=(
        gateway.url + "/v1/chat/completions",), kwargs={
        "headers": {"Authorization": f"Bearer {keys['heavy']}"}, "timeout": 60,
        "json": {"model": "shared", "messages": [slow]}}) for _ in range(CAPACITY)]
    stats(servers["shared"], reset=True)
    for holder in holders:
        holder.start()
    wait_for(lambda: stats(servers["shared"])["running"] == CAPACITY, what="the slots full")
    host, port = gateway.url.rsplit("//", 1)[1].split(":")
    body = (b'{"model":"shared","stream":true,"messages":[{"role":"user","content":"x"}]}')
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + keys["light"].encode() +
                     b"\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: waiting(gateway) == 1, what="the request to wait")
        shown = admin(gateway, "GET", "/queues").json()["data"]
        line = next(server for server in shown if server["model"] == "shared")
        assert line["capacity"] == CAPACITY and line["in_flight"] == CAPACITY
        assert line["waiting"] == [{"tenant": "light", "tier": "default", "requests": 1}]
    wait_for(lambda: waiting(gateway) == 0, what="the place to be freed")
    for holder in holders:
        holder.join(60)
    assert stats(servers["shared"])["generations"] == CAPACITY  # never sent to the worker


def waiting(gateway: Server) -> float:
    metrics = requests.get(gateway.url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("flaskchat_queue_waiting{") and 'model="shared"' in line)


def test_past_the_teams_waiting_cap_a_429_with_retry_after(
        gateway: Server, keys: dict[str, str]) -> None:
    with Loop(gateway, keys["heavy"], 26) as heavy:  # 2 run, 20 may wait, 4 refused
        wait_for(lambda: 429 in heavy.failed, 30, "a refusal")
    refused = [code for code in heavy.failed if code != 429]
    assert refused == []
    assert heavy.done  # the others were served


def test_a_stock_worker_gets_everything_at_once_unless_given_a_capacity(
        gateway: Server, servers: dict[str, Server], keys: dict[str, str]) -> None:
    for model, most in (("stock", 6), ("capped", CAPACITY)):
        stats(servers[model], reset=True)
        replies: list[int] = []
        threads = [threading.Thread(target=lambda: replies.append(
            chat(gateway, keys["light"], model).status_code)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert replies == [200] * 6
        assert stats(servers[model])["peak_arrived"] == most, model
        assert stats(servers[model])["peak"] <= CAPACITY


def test_the_queue_shows_in_server_timing(gateway: Server, keys: dict[str, str]) -> None:
    reply = chat(gateway, keys["light"])
    assert "queue;dur=" in reply.headers["Server-Timing"]
    assert "queue;dur=" not in chat(gateway, keys["light"], "stock").headers["Server-Timing"]


def test_two_gateway_processes_sharing_redis_share_the_worker_fairly(
        servers: dict[str, Server], database_url: str, keys: dict[str, str]) -> None:
    """Heavy's 16 streams land on one gateway process, light's questions on another: with
    --redis-url they share the worker's 2 slots and one fair line."""
    with redis_server() as redis:
        fleet = [start_gateway(servers["controller"].url, "--workers", "1", "--redis-url",
                               redis.url, env={**FAST, "FLASKCHAT_DATABASE_URL": database_url})
                 for _ in range(2)]
        try:
            for gateway in fleet:
                wait_for(lambda: chat(gateway, keys["light"], "fleet").status_code == 200,
                         what="the gateways to see the worker")
            solo = statistics.median(latencies(fleet[1], keys["light"], 5, "fleet"))
            stats(servers["fleet"], reset=True)
            with Loop(fleet[0], keys["heavy"], 16, model="fleet") as heavy:
                wait_for(lambda: stats(servers["fleet"])["running"] == CAPACITY,
                         what="heavy's load")
                contended = statistics.median(latencies(fleet[1], keys["light"], 7,
                                                        "fleet"))
            seen = stats(servers["fleet"])
        finally:
            for gateway in fleet:
                gateway.stop()
    print(f"\ntwo gateways on Redis: light alone {solo:.3f} s, behind heavy's 16 streams on "
          f"the other gateway {contended:.3f} s ({contended / solo:.2f}x); the worker saw "
          f"at most {seen['peak_arrived']} requests at once")
    assert seen["peak_arrived"] <= CAPACITY  # the fleet never sent it more
    assert contended <= 2 * solo
    assert heavy.done and not heavy.failed


def test_embeddings_in_batches_give_every_slot_back(
        gateway: Server, keys: dict[str, str]) -> None:
    reply = requests.post(gateway.url + "/v1/embeddings", timeout=30,
                          headers={"Authorization": f"Bearer {keys['light']}"},
                          json={"model": "shared", "input": [f"text {i}" for i in range(10)]})
    assert reply.status_code == 200, reply.text
    shown = admin(gateway, "GET", "/queues").json()["data"]
    assert next(s for s in shown if s["model"] == "shared")["in_flight"] == 0

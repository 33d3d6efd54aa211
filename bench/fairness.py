"""Fair sharing of a busy model, measured: a team asking one question at a time ("light")
beside a team keeping 16 streams going ("heavy"), with the queue in the worker (its
capacity not known to the gateway, as behind FastChat's API server) and in the gateway
(the worker reports it); two backlogged teams' shares at weights 1:1 and 2:1; and a flex
key beside a default one.

    python bench/fairness.py [--seconds 6] [--redis]

Starts on 127.0.0.1 the controller, fake workers that run 2 generations at once in
arrival order (tests/fake_worker.py, 16 tokens x 20 ms a reply) and one gateway process
with keys in SQLite; ``--redis`` adds a redis-server (Debian's) and a second gateway
process sharing it, with light's requests sent to the second. Prints a Markdown table.
Not part of the tests.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import (Server, new_database_url, start_controller,  # noqa: E402
                            start_fake_worker, start_gateway)
from tests.databases import redis_server  # noqa: E402
from tests.test_fair_sharing import CAPACITY, TOKEN_DELAY, Loop, stats  # noqa: E402
from tests.test_keys import FAST, make_key  # noqa: E402

MODEL = "in-gateway"  # the worker that reports its capacity
TEAMS: dict[str, dict[str, Any]] = {
    "heavy": {"team": "heavy"}, "light": {"team": "light"}, "big": {"team": "big", "weight": 2},
    "small": {"team": "small"}, "batch": {"team": "batch", "max_tier": "flex"}}


def light_latencies(gateway: Server, key: str, model: str, count: int) -> list[float]:
    found = []
    with requests.Session() as session:
        for _ in range(count):
            began = time.monotonic()
            reply = session.post(gateway.url + "/v1/chat/completions", timeout=120,
                                 headers={"Authorization": f"Bearer {key}"},
                                 json={"model": model, "messages": [
                                     {"role": "user", "content": "[[count:16]]"}]})
            reply.raise_for_status()
            found.append(time.monotonic() - began)
    return found


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def contention(heavy_at: Server, light_at: Server, keys: dict[str, str], worker: Server,
               model: str, seconds: float) -> dict[str, Any]:
    solo = light_latencies(light_at, keys["light"], model, 8)
    with Loop(heavy_at, keys["heavy"], 16, model=model) as heavy:
        deadline = time.monotonic() + 30
        while stats(worker)["running"] < CAPACITY and time.monotonic() < deadline:
            time.sleep(0.05)
        before, began = stats(worker)["busy"], time.monotonic()
        contended = light_latencies(light_at, keys["light"], model,
                                    max(int(seconds / 0.5), 8))
        used = (stats(worker)["busy"] - before) / ((time.monotonic() - began) * CAPACITY)
    return {"solo p50": statistics.median(solo), "solo p99": p(solo, 0.99),
            "busy p50": statistics.median(contended), "busy p99": p(contended, 0.99),
            "heavy rate": heavy.between(began, time.monotonic()) / (time.monotonic() - began),
            "worker used": used}


def shares(gateway: Server, keys: dict[str, str], first: str, second: str,
           seconds: float) -> tuple[int, int]:
    with Loop(gateway, keys[first], 6, model=MODEL) as one, \
            Loop(gateway, keys[second], 6, model=MODEL) as other:
        time.sleep(1.0)  # both backlogged
        began = time.monotonic()
        time.sleep(seconds)
        ended = time.monotonic()
    return one.between(began, ended), other.between(began, ended)


def flex(gateway: Server, keys: dict[str, str], seconds: float) -> tuple[int, int, int]:
    """(flex replies while default is backlogged, flex refusals then, flex replies
    alone), over ``seconds`` each."""
    with Loop(gateway, keys["heavy"], 6, model=MODEL), \
            Loop(gateway, keys["batch"], 2, model=MODEL) as beside:
        began = time.monotonic()
        time.sleep(seconds)
        served_beside = beside.between(began, time.monotonic())
        refused = sum(1 for code in beside.failed if code == 429)
    with Loop(gateway, keys["batch"], 4, model=MODEL) as alone:
        time.sleep(1.0)
        began = time.monotonic()
        time.sleep(seconds)
        served_alone = alone.between(began, time.monotonic())
    return served_beside, refused, served_alone


@contextlib.contextmanager
def stack(use_redis: bool) -> Iterator[dict[str, Any]]:
    started: list[Server] = []
    with contextlib.ExitStack() as stack_:
        controller = start_controller()
        started.append(controller)
        limit = ["--limit-worker-concurrency", str(CAPACITY), "--delay", str(TOKEN_DELAY)]
        workers = {"in-worker": start_fake_worker(controller.url, "--models", "in-worker",
                                                  *limit),
                   "in-gateway": start_fake_worker(controller.url, "--models", "in-gateway",
                                                   *limit, "--report-capacity")}
        started.extend(workers.values())
        database = new_database_url()
        env = {**FAST, "FLASKCHAT_DATABASE_URL": database,
               "FLASKCHAT_FLEX_QUEUE_TIMEOUT": "2"}
        extra: list[str] = []
        if use_redis:
            extra = ["--redis-url", stack_.enter_context(redis_server()).url]
        gateways = [start_gateway(controller.url, "--workers", "1", *extra, env=env)
                    for _ in range(2 if use_redis else 1)]
        started.extend(gateways)
        try:
            deadline = time.monotonic() + 30
            while "in-gateway" not in requests.get(gateways[0].url + "/ready").text:
                if time.monotonic() > deadline:
                    raise SystemExit("the gateway never saw the workers")
                time.sleep(0.2)
            keys = {name: make_key(gateways[0], name=name, **fields)["secret"]
                    for name, fields in TEAMS.items()}
            time.sleep(1.0)  # the other gateway's key refresh (FAST: 0.5 s)
            yield {"gateways": gateways, "workers": workers, "keys": keys}
        finally:
            for server in reversed(started):
                server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--redis", action="store_true",
                        help="two gateway processes sharing a redis-server; light's "
                        "requests go to the second")
    args = parser.parse_args()
    with stack(args.redis) as parts:
        gateways, workers, keys = parts["gateways"], parts["workers"], parts["keys"]
        light_at = gateways[-1]
        rows = []
        for label, model in (("queue in the worker (capacity not known)", "in-worker"),
                             ("queue in the gateway (capacity 2 reported)", "in-gateway")):
            found = contention(gateways[0], light_at, keys, workers[model], model,
                               args.seconds)
            rows.append((label, found))
        even = shares(gateways[0], keys, "heavy", "light", args.seconds) \
            if not args.redis else (0, 0)
        weighted = shares(gateways[0], keys, "big", "small", args.seconds) \
            if not args.redis else (0, 0)
        beside, refused, alone = flex(gateways[0], keys, args.seconds) \
            if not args.redis else (0, 0, 0)
    setup = "two gateway processes sharing Redis" if args.redis else "one gateway process"
    print(f"# Fair sharing ({setup}; worker: {CAPACITY} at once, 16 tokens x "
          f"{TOKEN_DELAY * 1000:.0f} ms a reply; {args.seconds:g} s windows)\n")
    print("| where the queue is | light alone p50 / p99 | light beside heavy's 16 streams "
          "p50 / p99 | ratio (p50) | heavy replies/s | worker busy |")
    print("|---|---|---|---|---|---|")
    for label, found in rows:
        print(f"| {label} | {found['solo p50']:.3f} / {found['solo p99']:.3f} s | "
              f"{found['busy p50']:.3f} / {found['busy p99']:.3f} s | "
              f"{found['busy p50'] / found['solo p50']:.2f}x | {found['heavy rate']:.1f} | "
              f"{found['worker used']:.0%} |")
    if not args.redis:
        print(f"\nTwo backlogged teams, weights 1:1: {even[0]} and {even[1]} replies "
              f"({even[0] / max(even[1], 1):.2f}); weights 2:1: {weighted[0]} and "
              f"{weighted[1]} ({weighted[0] / max(weighted[1], 1):.2f}).")
        print(f"Flex beside a backlogged default team: {beside} replies, {refused} "
              f"refused with 429 after --flex-queue-timeout (2 s here); flex alone: "
              f"{alone} replies (the whole worker).")


if __name__ == "__main__":
    main()

"""The controller's FastChat protocol: registration, heartbeats, expiry, dispatch."""
from __future__ import annotations

from typing import Any, Iterator

import pytest
import requests

from app.controller.registry import Registry
from tests.conftest import Server, start_controller, start_fake_worker, wait_for


def post(server: Server, path: str, body: Any = None) -> Any:
    response = requests.post(server.url + path, json=body if body is not None else {},
                             timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def controller() -> Iterator[Server]:
    server = start_controller("--heart-beat-expiration", "3")
    yield server
    server.stop()


def status(models: list[str], queue: int = 0, speed: float = 1) -> dict[str, Any]:
    return {"model_names": models, "speed": speed, "queue_length": queue}


def test_register_list_and_dispatch(controller: Server) -> None:
    assert requests.get(controller.url + "/test_connection").json() == "success"
    assert post(controller, "/register_worker", {
        "worker_name": "http://10.0.0.1:1", "check_heart_beat": False,
        "worker_status": status(["alpha", "beta"], queue=3)}) is None
    post(controller, "/register_worker", {
        "worker_name": "http://10.0.0.2:1/", "check_heart_beat": False,
        "worker_status": status(["alpha"], queue=0), "multimodal": True})
    assert sorted(post(controller, "/list_models")["models"]) == ["alpha", "beta"]
    assert post(controller, "/list_multimodal_models")["models"] == ["alpha"]
    assert post(controller, "/list_language_models")["models"] == ["alpha", "beta"]
    # shortest_queue: the idle worker, whose queue then counts the request
    picks = [post(controller, "/get_worker_address", {"model": "alpha"})["address"]
             for _ in range(4)]
    assert picks[:3] == ["http://10.0.0.2:1"] * 3 and picks[3] == "http://10.0.0.1:1"
    assert post(controller, "/get_worker_address", {"model": "nope"}) == {"address": ""}
    workers = post(controller, "/list_workers")["workers"]
    assert {w["name"] for w in workers} >= {"http://10.0.0.1:1", "http://10.0.0.2:1"}
    total = post(controller, "/worker_get_status")
    assert set(total["model_names"]) >= {"alpha", "beta"} and total["speed"] >= 2


def test_heartbeat_and_expiry(controller: Server) -> None:
    name = "http://10.0.0.9:1"
    assert post(controller, "/receive_heart_beat",
                {"worker_name": name, "queue_length": 0}) == {"exist": False}
    post(controller, "/register_worker", {"worker_name": name, "check_heart_beat": True,
                                          "worker_status": status(["expiring"])})
    assert post(controller, "/receive_heart_beat",
                {"worker_name": name, "queue_length": 2}) == {"exist": True}
    assert "expiring" in post(controller, "/list_models")["models"]
    # Expiration is 3 s: then it is gone from dispatch, and a late heartbeat is told to
    # register again.
    wait_for(lambda: "expiring" not in post(controller, "/list_models")["models"], 10)
    assert post(controller, "/get_worker_address", {"model": "expiring"}) == {"address": ""}
    assert post(controller, "/receive_heart_beat",
                {"worker_name": name, "queue_length": 0}) == {"exist": False}


def test_register_without_status_polls_the_worker_and_refresh(controller: Server) -> None:
    worker = start_fake_worker("", "--models", "polled-model")
    try:
        post(controller, "/register_worker", {"worker_name": worker.url,
                                              "check_heart_beat": False})
        assert "polled-model" in post(controller, "/list_models")["models"]
        worker.stop()
        post(controller, "/refresh_all_workers")  # drops workers that do not answer
        assert "polled-model" not in post(controller, "/list_models")["models"]
    finally:
        worker.stop()


def test_unreachable_worker_is_not_registered(controller: Server) -> None:
    post(controller, "/register_worker", {"worker_name": "http://127.0.0.1:9",
                                          "check_heart_beat": False})
    assert "http://127.0.0.1:9" not in {
        w["name"] for w in post(controller, "/list_workers")["workers"]}


@pytest.mark.parametrize("path, body", [
    ("/register_worker", {"worker_name": "not a url", "worker_status": status(["m"])}),
    ("/register_worker", {"check_heart_beat": True}),
    ("/register_worker", {"worker_name": "http://a:1", "worker_status": {"speed": 1}}),
    ("/receive_heart_beat", {"queue_length": 1}),
    ("/get_worker_address", {}),
    ("/get_worker_address", {"model": 5}),
])
def test_bad_controller_input_is_400(controller: Server, path: str, body: Any) -> None:
    response = requests.post(controller.url + path, json=body, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_proxied_generation(controller: Server) -> None:
    worker = start_fake_worker(controller.url, "--models", "proxied")
    try:
        raw = requests.post(controller.url + "/worker_generate_stream", json={
            "model": "proxied", "prompt": "hi"}, timeout=10).content
        assert raw.endswith(b"\0") and b"Hello! I am a fake model." in raw
        missing = requests.post(controller.url + "/worker_generate_stream",
                                json={"model": "absent"}, timeout=10).content
        assert b"50005" in missing
    finally:
        worker.stop()


def test_dispatch_rules_in_process() -> None:
    clock = [100.0]
    registry = Registry("lottery", 90, lambda name: None, clock=lambda: clock[0])
    registry.register("http://a", True, status(["m"], speed=0), False)
    registry.register("http://b", True, status(["m"], speed=0), False)
    assert registry.pick("m") in ("http://a", "http://b")  # no division by zero
    shortest = Registry("shortest_queue", 90, lambda name: None, clock=lambda: clock[0])
    shortest.register("http://slow", True, status(["m"], queue=1, speed=0), False)
    shortest.register("http://fast", True, status(["m"], queue=4, speed=4), False)
    assert shortest.pick("m") == "http://fast"
    clock[0] += 91
    assert shortest.pick("m") == ""  # overdue heartbeats are never dispatched to


def test_expiry_in_process() -> None:
    """The sweep forgets overdue workers; a late heartbeat is told to register again."""
    clock = [100.0]
    registry = Registry("shortest_queue", 90, lambda name: None, clock=lambda: clock[0])
    for name in ("http://late", "http://gone", "http://fine"):
        registry.register(name, True, status(["m"]), False)
    clock[0] += 60
    assert registry.heartbeat("http://fine", 0)
    clock[0] += 31  # the others are 91 s old now
    assert registry.heartbeat("http://late", 0) is False
    assert registry.remove_stale() == ["http://gone"]
    assert [r.name for r in registry.live_workers()] == ["http://fine"]
    assert registry.heartbeat("http://gone", 0) is False

"""Registration with the controller and the heartbeat that keeps the worker listed.

Unlike FastChat's worker, a controller that is down at start is not fatal: the worker keeps
trying in the background, so start-up order does not matter.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import requests

from app.config import WorkerSettings

log = logging.getLogger("flaskchat.worker")
RETRY_DELAY = 2.0
TIMEOUT = (5.0, 5.0)


def start(settings: WorkerSettings, status: Callable[[], dict[str, Any]]) -> threading.Thread:
    thread = threading.Thread(target=_keep_registered, args=(settings, status),
                              name="controller-heartbeat", daemon=True)
    thread.start()
    return thread


def _keep_registered(settings: WorkerSettings, status: Callable[[], dict[str, Any]]) -> None:
    session = requests.Session()
    session.trust_env = False
    if settings.controller_secret:
        session.headers["Authorization"] = f"Bearer {settings.controller_secret}"
    controller = settings.controller_address.rstrip("/")
    registered = False
    while True:
        try:
            if not registered:
                _post(session, controller + "/register_worker", {
                    "worker_name": settings.address, "check_heart_beat": True,
                    "worker_status": status(), "multimodal": False})
                registered = True
                log.info("registered with %s as %s", controller, settings.address)
            time.sleep(settings.heart_beat_interval)
            answer = _post(session, controller + "/receive_heart_beat", {
                "worker_name": settings.address, "queue_length": status()["queue_length"]})
            registered = bool(answer and answer.get("exist"))
            if not registered:
                log.info("the controller forgot this worker; registering again")
        except requests.RequestException as exc:
            registered = False
            log.warning("controller %s unreachable (%s); retrying", controller,
                        type(exc).__name__)
            time.sleep(RETRY_DELAY)


def _post(session: requests.Session, url: str, body: dict[str, Any]) -> Any:
    response = session.post(url, json=body, timeout=TIMEOUT)
    response.raise_for_status()
    return response.json()

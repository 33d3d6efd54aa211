"""Servers that failed a call are skipped until they show life again: for a FastChat
worker, a newer heartbeat at the controller or an answer to a probe of its
/worker_get_status; for an OpenAI-compatible upstream, an answer to a probe of its
/models (every few seconds, in the background). FastChat keeps routing to a dead worker
until the controller expires it, 90 to 180 s later."""
from __future__ import annotations

import logging
import threading
import time
from functools import partial
from typing import Callable

import requests

from app.upstream.session import post_json

log = logging.getLogger("flaskchat.health")

PROBE_INTERVAL = 2.0
PROBE_TIMEOUT = (2.0, 2.0)
GIVE_UP_AFTER = 600.0  # then real traffic decides again


class ServerHealth:
    def __init__(self, session: requests.Session, probe_interval: float = PROBE_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._session = session
        self._interval = probe_interval
        self._clock = clock
        self._failed: dict[str, float | None] = {}  # address -> heartbeat seen at failure
        self._unreachable: set[str] = set()  # of those, the ones that refused or hung
        self._probing: set[str] = set()  # one probe thread per address at most

    @property
    def probing(self) -> int:
        """Failed workers being probed (each by one background thread)."""
        return len(self._probing)

    def healthy(self, address: str) -> bool:
        return address not in self._failed

    def reachable(self, address: str) -> bool:
        """False for a worker that refused or timed out a connection (it is down); one that
        answered badly or slowly is up, if unwell."""
        return address not in self._unreachable

    def failed(self, address: str, heartbeat: float | None = None,
               unreachable: bool = False, probe: Callable[[], bool] | None = None) -> None:
        """``probe`` says whether the server answers again; the default asks a FastChat
        worker's /worker_get_status."""
        self._failed[address] = heartbeat
        if unreachable:
            self._unreachable.add(address)
        if address not in self._probing:
            self._probing.add(address)
            log.warning("%s failed; skipping it until it answers again", address)
            threading.Thread(target=self._probe, args=(address, probe or partial(
                self._worker_answers, address)), daemon=True).start()

    def saw_heartbeat(self, address: str, heartbeat: float) -> None:
        if address in self._failed:
            before = self._failed[address]
            if before is not None and heartbeat > before:
                self._recovered(address, "a newer heartbeat")

    def _worker_answers(self, address: str) -> bool:
        response = post_json(self._session, address + "/worker_get_status", {}, PROBE_TIMEOUT)
        return response.status_code == 200

    def _probe(self, address: str, answers: Callable[[], bool]) -> None:
        deadline = self._clock() + GIVE_UP_AFTER
        try:
            while address in self._failed and self._clock() < deadline:
                time.sleep(self._interval)
                try:
                    if answers():
                        self._recovered(address, "a probe")
                        return
                except requests.RequestException:
                    pass
            self._failed.pop(address, None)
            self._unreachable.discard(address)
        finally:
            self._probing.discard(address)

    def _recovered(self, address: str, how: str) -> None:
        self._unreachable.discard(address)
        if self._failed.pop(address, "gone") != "gone":
            log.info("%s is back (%s)", address, how)

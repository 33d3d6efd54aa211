"""A cache whose stale entries are served while one background refresh runs.

Requests never wait for a refresh once a value exists; only the first use of a key (or
one after ``invalidate``) loads synchronously, and a key whose load just failed fails again
at once for a ttl instead of making every request wait for the same dead server.
Background work runs in a thread, which gunicorn's gevent worker has already turned into a
greenlet.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

log = logging.getLogger("flaskchat.cache")


class RefreshingCache(Generic[K, V]):
    def __init__(self, loader: Callable[[K], V], ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._loader = loader
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[K, tuple[float, V]] = {}
        self._refreshing: set[K] = set()
        self.errors: dict[K, str] = {}  # the last failed load per key, until one succeeds
        self._failures: dict[K, tuple[float, Exception]] = {}  # for keys with no value

    def get(self, key: K) -> V:
        entry = self._entries.get(key)
        if entry is None:
            failure = self._failures.get(key)
            if failure is not None and self._clock() - failure[0] < self._ttl:
                raise copy.copy(failure[1]).with_traceback(None)  # each caller's own
            return self.load(key)
        loaded_at, value = entry
        if self._clock() - loaded_at > self._ttl:
            self.refresh_soon(key)
        return value

    def refresh_soon(self, key: K) -> None:
        """Starts a background refresh of ``key`` unless one is running."""
        if key not in self._refreshing:
            self._refreshing.add(key)
            threading.Thread(target=self._refresh, args=(key,), daemon=True).start()

    def peek(self, key: K) -> V | None:
        entry = self._entries.get(key)
        return entry[1] if entry else None

    def age(self, key: K) -> float | None:
        entry = self._entries.get(key)
        return self._clock() - entry[0] if entry else None

    def load(self, key: K) -> V:
        """Loads now, replacing the entry; the loader's exceptions propagate."""
        try:
            value = self._loader(key)
        except Exception as exc:
            self.errors[key] = str(exc)
            self._failures[key] = (self._clock(), exc)
            raise
        self._entries[key] = (self._clock(), value)
        self.errors.pop(key, None)
        self._failures.pop(key, None)
        return value

    def invalidate(self, key: K) -> None:
        self._entries.pop(key, None)

    def _refresh(self, key: K) -> None:
        try:
            self.load(key)
        except Exception as exc:
            # Keep serving the stale value, and wait a whole ttl before trying again.
            log.warning("background refresh of %r failed: %s", key, exc)
            entry = self._entries.get(key)
            if entry is not None:
                self._entries[key] = (self._clock(), entry[1])
        finally:
            self._refreshing.discard(key)

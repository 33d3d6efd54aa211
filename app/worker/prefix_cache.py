"""The key-value cache of recent prompts, so that a prompt which starts like one of them (the
same system prompt, a chat's earlier turns, a retried request) feeds in only the tokens that
differ: copying a prefix's keys and values into a row costs a fraction of a millisecond,
computing them about a millisecond per token on two cores (SmolLM2).

Bounded in bytes, least recently used first out.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import numpy as np

Snapshot = list[np.ndarray[Any, Any]]  # one [kv_heads, tokens, head_dim] array per buffer
SHORTEST = 4  # fewer shared tokens are not worth a lookup's copy


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], Snapshot] = OrderedDict()
        self._bytes = 0

    def longest(self, prompt: list[int]) -> tuple[int, Snapshot | None]:
        """The most tokens at the start of ``prompt`` that a stored prompt shares, and its
        snapshot (0 and None when fewer than SHORTEST)."""
        wanted = np.asarray(prompt)
        best, found = 0, None
        for key in self._entries:
            size = min(len(key), len(prompt))
            differ = np.flatnonzero(np.asarray(key[:size]) != wanted[:size])
            shared = int(differ[0]) if len(differ) else size
            if shared > best:
                best, found = shared, key
        if found is None or best < SHORTEST:
            return 0, None
        self._entries.move_to_end(found)
        return best, self._entries[found]

    def add(self, prompt: list[int], take: Callable[[], Snapshot]) -> None:
        """Stores ``prompt``'s snapshot, copied by ``take`` only when it is new (a repeat,
        or a cache of no size, copies nothing)."""
        key = tuple(prompt)
        if self.max_bytes <= 0 or key in self._entries:
            return
        snapshot = take()
        size = sum(part.nbytes for part in snapshot)
        if size > self.max_bytes:
            return
        self._entries[key] = snapshot
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= sum(part.nbytes for part in dropped)

"""Python's cyclic garbage collector in a gevent process that serves requests: what the
app loaded at start-up is frozen out of its collections.

Measured in a gateway process under bench/run.py's "stream c=256" load (Python 3.11):
every 5 s the collector made one or two full collections of 80-90 ms each, on the one
hub that serves every request. Each walked the ~90,000 objects of the start-up (modules,
the app, its settings), which live as long as the process. ``gc.freeze()`` leaves them
out: a full collection takes 15 ms, and the young and middle ones a little less too
(about 245 ms of collection in 5 s instead of 375).

The thresholds stay Python's. A young generation of 20,000 objects cut the collection
time to 35-65 ms in 5 s, but it let garbage wait longer: with 5,000 slow streams held
open a process grew by 37.7-41.4 KiB per stream instead of 35.8-36.2 (the gateway's
limit is 40 KB).
"""
from __future__ import annotations

import gc


def settle_after_start_up() -> None:
    """In a serving process, once its app is loaded and before the first request."""
    gc.collect()  # start-up's garbage, not to be frozen with the rest
    gc.freeze()

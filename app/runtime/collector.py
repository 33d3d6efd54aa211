"""Python's cyclic garbage collector, set for a gevent process that serves requests.

Measured in a gateway process under bench/run.py's "stream c=256" load (Python 3.11, the
default thresholds of 700, 10, 10), the collector took 7% of the process's CPU: about 150
young collections of ~1.2 ms every 5 s (each walks the young objects of every stream in
flight), ~13 of 8 ms, and one or two full collections of 55-150 ms that walk everything
the app loaded at start-up, all on the one hub that serves every request.

Two settings, taken once the app is loaded:
- ``gc.freeze()``: what start-up made (modules, the app, its settings) lives as long as
  the process; full collections no longer walk it.
- A young generation of 20,000 objects instead of 700: a request's objects mostly die by
  reference counting before a collection, so fewer collections walk the same live
  objects of the streams in flight. Measured: 3-4 young collections of 11-20 ms in the
  same 5 s, no full one; 35-65 ms of collection in all instead of 330-470 ms, and the
  longest pause shorter than the full collections it replaces.
"""
from __future__ import annotations

import gc

YOUNG_OBJECTS = 20_000  # allocations (less deallocations) between young collections


def settle_after_start_up() -> None:
    """In a serving process, once its app is loaded and before the first request."""
    gc.collect()  # start-up's garbage, not to be frozen with the rest
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_OBJECTS, older, oldest)

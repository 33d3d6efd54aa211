"""Prometheus metrics for the gateway, summed over gunicorn's worker processes.

With PROMETHEUS_MULTIPROC_DIR set before prometheus_client is first imported (the arbiter
sets it: see ``app.runtime.state_dir``), every process writes its values to files there and
/metrics adds them up; without it (one process, e.g. tests in-process) they live in memory.
Labels are bounded: routes come from the URL map, models from the known list, error kinds
from the exception classes, so no client can grow the series without limit.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter,
                               Gauge, Histogram, generate_latest)

from app.runtime.state_dir import METRICS_ENV

if TYPE_CHECKING:
    from app.errors import APIError

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0)

REQUESTS = Counter("flaskchat_requests", "Requests answered, by route, model and status.",
                   ["route", "model", "status"])
LATENCY = Histogram("flaskchat_request_duration_seconds",
                    "Time from the request to the last byte of the response (whole stream).",
                    ["route"], buckets=LATENCY_BUCKETS)
TTFT = Histogram("flaskchat_time_to_first_token_seconds",
                 "Streams: time from the request to the first generated text sent.",
                 ["route"], buckets=TTFT_BUCKETS)
TOKENS = Counter("flaskchat_generated_tokens", "Completion tokens the workers generated.",
                 ["model"])
STREAMS = Gauge("flaskchat_streams_in_flight", "SSE streams open now.",
                multiprocess_mode="livesum")
UPSTREAM_ERRORS = Counter(
    "flaskchat_upstream_errors",
    "Failures of workers or the controller (answered with a 5xx, ended a stream, or sent "
    "the request to another worker), by kind.", ["kind"])
RETRIES = Counter("flaskchat_upstream_retries",
                  "Requests sent to another worker after the first one failed.", ["model"])

TRACE_SPANS_DROPPED = Counter(
    "flaskchat_trace_spans_dropped",
    "Trace spans not exported: the export queue was full, or the collector failed or did "
    "not answer in time (requests never wait for it).")

REFUSED = Counter("flaskchat_rate_limited",
                  "Requests answered 429, by reason: requests, tokens, parallel (a key's "
                  "limits), budget (its quota), overloaded (this process at capacity), "
                  "queue (a busy model's line full, or waited too long).",
                  ["reason"])
KEY_REQUESTS = Counter("flaskchat_key_requests",
                       "Model requests by API key name (bounded: see --metrics-key-labels).",
                       ["key"])
KEY_TOKENS = Counter("flaskchat_key_tokens",
                     "Prompt and completion tokens by API key name (bounded).",
                     ["key", "kind"])
USAGE_BUFFERED = Gauge("flaskchat_usage_buffered_records",
                       "Usage records waiting to be written to the database.",
                       multiprocess_mode="livesum")
USAGE_DROPPED = Counter("flaskchat_usage_dropped_records",
                        "Usage records dropped because the buffer was full while the "
                        "database could not be written.")
USAGE_REJECTED = Counter("flaskchat_usage_rejected_records",
                         "Usage records the database rejected (written alone, logged, "
                         "dropped); the rest of their batch was written.")
QUEUE_WAITING = Gauge("flaskchat_queue_waiting",
                      "Requests waiting in the gateway for a busy model server's slot, by "
                      "model and service tier.", ["model", "tier"],
                      multiprocess_mode="livesum")
QUEUE_WAIT = Histogram("flaskchat_queue_wait_seconds",
                       "Time the requests that waited for a model server's slot waited, by "
                       "team (bounded as key names are: see --metrics-key-labels).", ["team"],
                       buckets=LATENCY_BUCKETS)
SLOTS_IN_USE = Gauge("flaskchat_server_slots_in_use",
                     "Requests holding a slot of a model server whose capacity is known, "
                     "by server.", ["server"], multiprocess_mode="livesum")
OTHER_KEYS = "_other"
NO_KEY = "_none"


class BoundedLabels:
    """Names as metric labels: the first ``room`` a process sees are themselves, later
    ones "_other", so the series stay bounded however many names exist."""

    def __init__(self, room: int) -> None:
        self.room = max(room, 0)
        self._labels: set[str] = set()

    def __call__(self, name: str) -> str:
        if name in self._labels:
            return name
        if len(self._labels) < self.room:
            self._labels.add(name)
            return name
        return OTHER_KEYS


class AccessMetrics:
    """Refusals, the usage ledger and per-key counts. Key names are labels only for the
    first ``key_labels`` names a process sees; later ones count as "_other", so the series
    stay bounded however many keys the database holds (names come from the database,
    never from a client)."""

    def __init__(self, key_labels: int) -> None:
        self._label = BoundedLabels(key_labels)
        self._pending: dict[str, list[int]] = {}  # label -> [requests, prompt, completion]

    def refused(self, reason: str) -> None:
        REFUSED.labels(reason).inc()

    def buffered(self, records: int) -> None:
        """The usage ledger reports after every write (each flush interval): the per-key
        counts gathered since go into the counters then, so that a request costs a dict
        update instead of three counter writes."""
        USAGE_BUFFERED.set(records)
        self.fold()

    def dropped(self, records: int) -> None:
        USAGE_DROPPED.inc(records)

    def rejected(self, records: int) -> None:
        USAGE_REJECTED.inc(records)

    def used(self, key_name: str | None, prompt_tokens: int, completion_tokens: int) -> None:
        if not self._label.room:
            return
        counts = self._pending.get(key_name or NO_KEY)
        if counts is None:
            counts = self._pending.setdefault(self._label(key_name or NO_KEY), [0, 0, 0])
        counts[0] += 1
        counts[1] += prompt_tokens
        counts[2] += completion_tokens

    def fold(self) -> None:
        pending, self._pending = self._pending, {}
        for label, (requests, prompt, completion) in pending.items():
            KEY_REQUESTS.labels(label).inc(requests)
            if prompt:
                KEY_TOKENS.labels(label, "prompt").inc(prompt)
            if completion:
                KEY_TOKENS.labels(label, "completion").inc(completion)


class QueueMetrics:
    """What the model servers' lines report (``app.scheduling.slots.QueueObserver``).
    Team names are labels for the first ``team_labels`` a process sees, as key names."""

    def __init__(self, team_labels: int) -> None:
        self._label = BoundedLabels(team_labels)

    def waiting(self, model: str, tier: str, change: int) -> None:
        QUEUE_WAITING.labels(model, tier).inc(change)

    def waited(self, model: str, tier: str, tenant: str, seconds: float) -> None:
        QUEUE_WAIT.labels(self._label(tenant)).observe(seconds)

    def refused(self, model: str, tier: str, reason: str) -> None:
        REFUSED.labels("queue").inc()

    def slots(self, server: str, in_use: int, change: int) -> None:
        SLOTS_IN_USE.labels(server).inc(change)


class UpstreamFailures:
    """What the gateway's upstream (``app.upstream.failover``), error handler and SSE
    guard report failures to: each failure is counted once, however many of them see it."""

    def failed(self, error: "APIError") -> None:
        if not error.counted:
            error.counted = True
            UPSTREAM_ERRORS.labels(type(error).__name__).inc()

    def retried(self, model: str) -> None:
        RETRIES.labels(model).inc()


def exposition() -> tuple[bytes, str]:
    """The text /metrics serves, and its content type."""
    return generate_latest(_registry()), CONTENT_TYPE_LATEST


_multiprocess_registry: CollectorRegistry | None = None


def _registry() -> CollectorRegistry:
    global _multiprocess_registry
    if not os.environ.get(METRICS_ENV):
        return REGISTRY
    if _multiprocess_registry is None:
        from prometheus_client import multiprocess

        _multiprocess_registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(_multiprocess_registry)  # type: ignore[no-untyped-call]
    return _multiprocess_registry

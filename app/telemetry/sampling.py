"""The gateway's sampler (app.telemetry.tracing): the gateway decides which requests are
traced, whatever a client's ``traceparent`` flags say. With OpenTelemetry's parent-based
samplers a client that sets the sampled flag on every request would be traced at 100%
under a 1% setting (and fill the shared export queue, on every tenant's CPU), and one
that clears it would hide from tracing. The client's trace is still continued: its trace
id and span become the request's parent either way.

Within the process, and in flaskchat's worker (whose parent is the gateway), a span
follows its parent's decision as usual.
"""
from __future__ import annotations

import os
import random
from typing import Any, Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, get_current_span
from opentelemetry.util.types import Attributes

RATIOS = {"always_on": 1.0, "parentbased_always_on": 1.0, "always_off": 0.0,
          "parentbased_always_off": 0.0}
BY_RATIO = ("traceidratio", "parentbased_traceidratio")


def configured_ratio() -> float | None:
    """The share of requests OTEL_TRACES_SAMPLER(_ARG) asks for; None for a sampler that
    is not a ratio (jaeger_remote...: the SDK's own, reading the environment)."""
    name = (os.environ.get("OTEL_TRACES_SAMPLER") or "parentbased_always_on").strip().lower()
    if name in RATIOS:
        return RATIOS[name]
    if name in BY_RATIO:
        try:
            return min(max(float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0")), 0.0), 1.0)
        except ValueError:
            return 1.0
    return None


class GatewaySampler(Sampler):
    def __init__(self, ratio: float) -> None:
        self._ratio = ratio

    def should_sample(self, parent_context: Context | None, trace_id: int, name: str,
                      kind: SpanKind | None = None, attributes: Attributes = None,
                      links: Sequence[Link] | None = None,
                      trace_state: Any = None) -> SamplingResult:
        parent = get_current_span(parent_context).get_span_context()
        if parent.is_valid and not parent.is_remote:  # a span of ours: as its parent
            sampled = parent.trace_flags.sampled
        else:  # a request's root: ours to decide, not the client's
            sampled = self._ratio >= 1.0 or random.random() < self._ratio
        return SamplingResult(Decision.RECORD_AND_SAMPLE if sampled else Decision.DROP,
                              attributes if sampled else None,
                              parent.trace_state if parent.is_valid else None)

    def get_description(self) -> str:
        return f"GatewaySampler{{{self._ratio}}}"

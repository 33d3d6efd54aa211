"""Which requests are traced, from OpenTelemetry's ``OTEL_TRACES_SAMPLER(_ARG)``.

The gateway decides by its own ratio whatever a client's ``traceparent`` flags say. With
parent-based sampling a client that sets the sampled flag on every request would be
traced at 100% under a 1% setting (and fill the shared export queue, on every tenant's
CPU), and one that clears it would hide from tracing. The client's trace is still
continued: its trace id and span become the request's parent either way.

Behind the gateway (flaskchat's worker) a request follows its caller's decision, as
OpenTelemetry's parent-based samplers do; ``always_on``, ``always_off`` and
``traceidratio`` ignore the caller there too.

The ratio is a random draw per request, not a function of the trace id as in the SDK's
``TraceIdRatioBased``: a client picks the trace id of its ``traceparent``, and could pick
one that is always (or never) traced.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

log = logging.getLogger("flaskchat.tracing")

RATIOS = {"always_on": 1.0, "parentbased_always_on": 1.0, "always_off": 0.0,
          "parentbased_always_off": 0.0}
BY_RATIO = ("traceidratio", "parentbased_traceidratio")
DEFAULT = "parentbased_always_on"


@dataclass(frozen=True)
class Sampling:
    ratio: float  # of the requests that start here (no caller's decision to follow)
    follow_caller: bool  # whether a caller's sampled flag decides

    def decide(self, caller_sampled: bool | None) -> bool:
        """``caller_sampled``: the flag of the caller's ``traceparent``, None without
        one."""
        if caller_sampled is not None and self.follow_caller:
            return caller_sampled
        return self.ratio >= 1.0 or random.random() < self.ratio


def from_environment(role: str) -> Sampling:
    """The sampling OTEL_TRACES_SAMPLER(_ARG) asks for in this process; the gateway never
    follows a caller (above)."""
    name = (os.environ.get("OTEL_TRACES_SAMPLER") or DEFAULT).strip().lower()
    if name in RATIOS:
        ratio = RATIOS[name]
    elif name in BY_RATIO:
        ratio = _ratio(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
    else:
        log.warning("OTEL_TRACES_SAMPLER=%s is not supported here (always_on, always_off, "
                    "traceidratio and their parentbased_ forms are): using %s", name, DEFAULT)
        name, ratio = DEFAULT, 1.0
    return Sampling(ratio, follow_caller=name.startswith("parentbased_") and role != "gateway")


def _ratio(text: str) -> float:
    try:
        return min(max(float(text), 0.0), 1.0)
    except ValueError:
        return 1.0

"""W3C Trace Context (https://www.w3.org/TR/trace-context/): reading a request's
``traceparent`` / ``tracestate`` headers and writing them on outgoing calls.

A malformed header is ignored as a whole (the request then starts a trace of its own),
as the recommendation says; a ``tracestate`` is passed on only if every member is well
formed and there are at most 32 of them.
"""
from __future__ import annotations

import random
import re
from typing import Any, NamedTuple

_TRACEPARENT = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\s]*)?")
_MEMBER = re.compile(
    r"(?:[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13}|[a-z][_0-9a-z\-*/]{0,255})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
MAX_MEMBERS = 32
MAX_TRACESTATE = 512  # characters kept; the spec lets a vendor drop a longer one


class Parent(NamedTuple):
    """The caller's span: the trace id and span id (ints), its sampled flag and the
    tracestate to carry on ("" for none)."""
    trace_id: int
    span_id: int
    sampled: bool
    tracestate: str


def extract(headers: Any) -> Parent | None:
    """The caller's span from ``headers`` (anything with ``.get``); None without a valid
    ``traceparent``."""
    value = headers.get("traceparent")
    if not value:
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_hex, span_hex, flags, rest = match.groups()
    # Version ff is forbidden; version 00 has exactly four fields; a later version may add
    # fields after them, which are ignored.
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return Parent(trace_id, span_id, bool(int(flags, 16) & 1),
                  _tracestate(headers.get("tracestate") or ""))


def _tracestate(value: str) -> str:
    members = [member.strip() for member in value.split(",") if member.strip()]
    if not members or len(members) > MAX_MEMBERS or len(value) > MAX_TRACESTATE:
        return ""
    keys = set()
    for member in members:
        if _MEMBER.fullmatch(member) is None:
            return ""
        keys.add(member.split("=", 1)[0])
    return ",".join(members) if len(keys) == len(members) else ""


def traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def new_trace_id() -> int:
    """A random, non-zero 128-bit trace id (random's generator, as OpenTelemetry's SDK)."""
    return random.getrandbits(128) or 1


def new_span_id() -> int:
    return random.getrandbits(64) or 1

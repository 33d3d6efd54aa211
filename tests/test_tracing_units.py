"""Tracing's pure logic in process (no sockets, no sleeps): who decides sampling, where
concurrent spans of one request hang; and the cross-process lock the ONNX exports take."""
from __future__ import annotations

import contextvars
import fcntl
import threading
from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("opentelemetry.sdk")

import opentelemetry.trace  # noqa: E402
from opentelemetry.context import Context  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import \
    InMemorySpanExporter  # noqa: E402
from opentelemetry.sdk.trace.sampling import Decision  # noqa: E402
from opentelemetry.trace import (NonRecordingSpan, SpanContext, TraceFlags,  # noqa: E402
                                 set_span_in_context)
from opentelemetry.trace.propagation.tracecontext import \
    TraceContextTextMapPropagator  # noqa: E402

from app.telemetry import tracing  # noqa: E402
from app.telemetry.sampling import GatewaySampler, configured_ratio  # noqa: E402
from app.worker.onnx_export import export_lock  # noqa: E402

TRACE_ID, SPAN_ID = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331


def parent(sampled: bool, remote: bool) -> Context:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return set_span_in_context(NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, remote, flags)))


@pytest.mark.parametrize("ratio, client_flag, traced", [
    (0.0, True, False),  # a client's sampled flag does not force tracing
    (1.0, False, True),  # nor does clearing it hide the request
])
def test_the_gateway_decides_whatever_the_client_flags(ratio: float, client_flag: bool,
                                                       traced: bool) -> None:
    result = GatewaySampler(ratio).should_sample(parent(client_flag, remote=True), TRACE_ID,
                                                 "POST /v1/chat/completions")
    assert (result.decision is Decision.RECORD_AND_SAMPLE) is traced


def test_a_span_of_ours_follows_its_parent() -> None:
    for sampled in (True, False):
        result = GatewaySampler(0.5).should_sample(parent(sampled, remote=False), TRACE_ID,
                                                   "upstream attempt")
        assert (result.decision is Decision.RECORD_AND_SAMPLE) is sampled


def test_the_ratio_comes_from_opentelemetrys_variables(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    assert configured_ratio() == 1.0
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.01")
    assert configured_ratio() == 0.01
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    assert configured_ratio() == 0.0
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "jaeger_remote")
    assert configured_ratio() is None  # the SDK's own sampler, from the environment


@pytest.fixture()
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "TRACER", provider.get_tracer("test"))
    monkeypatch.setattr(tracing, "_api", opentelemetry.trace)
    monkeypatch.setattr(tracing, "_PROPAGATOR", TraceContextTextMapPropagator())
    yield exporter


def test_concurrent_attempts_of_one_request_each_hang_under_its_root(
        spans: InMemorySpanExporter) -> None:
    """Two attempts inside each other's time (an embeddings request's batches): each is a
    child of the root, sends its own traceparent, and the span after them is the root's
    child again (one shared "current span" would leave it under an ended sibling)."""
    trace = tracing.start("root", None)
    assert trace is not None
    both_in = threading.Barrier(2, timeout=10)
    sent: dict[str, str] = {}

    def attempt(name: str) -> None:
        with trace.child(name) as span:
            both_in.wait()
            headers: dict[str, str] = {}
            trace.inject(headers)
            sent[name] = headers["traceparent"]
            assert f"{span.get_span_context().span_id:016x}" in sent[name]
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(attempt, n))
               for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with trace.child("after"):
        pass
    trace.root.end()
    by_name = {s.name: s for s in spans.get_finished_spans()}
    root = by_name["root"].get_span_context()
    assert root is not None
    parents = [by_name[n].parent for n in ("a", "b", "after")]
    assert [p.span_id if p is not None else None for p in parents] == [root.span_id] * 3
    assert sent["a"] != sent["b"]


def test_one_export_at_a_time_and_stale_partials_go(tmp_path: Path) -> None:
    target = tmp_path / "model-v2-abc"
    stale = tmp_path / "model-v2-abc.partial-1234"
    stale.mkdir()
    with export_lock(target):
        assert not stale.exists()  # a killed export's leftovers
        with open(tmp_path / "model-v2-abc.lock", "a") as other:  # another process's try
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / "model-v2-abc.lock", "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again


def test_the_log_line_keeps_a_collectors_credentials_out() -> None:
    assert tracing._without_credentials("https://user:s3cret@otel.example:4318/v1/traces") \
        == "https://otel.example:4318/v1/traces"
    assert tracing._without_credentials("http://otel:4318/v1/traces") == \
        "http://otel:4318/v1/traces"

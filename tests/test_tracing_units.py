"""Tracing's pure logic in process (no sockets, no sleeps): W3C trace context, who decides
sampling, where concurrent spans of one request hang, what the export helper builds from
a span record, the bounded queue; and the cross-process lock the ONNX exports take."""
from __future__ import annotations

import contextvars
import fcntl
import gc
import random
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from app.telemetry import span_export, trace_context, tracing
from app.telemetry.sampling import Sampling, from_environment
from app.worker.onnx_export import export_lock

TRACE_ID, SPAN_ID = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


# ---- W3C trace context -------------------------------------------------------------------

def test_a_valid_traceparent_and_tracestate_are_read() -> None:
    parent = trace_context.extract({"traceparent": TRACEPARENT,
                                    "tracestate": "team=a, vendor@sys=x-1"})
    assert parent == trace_context.Parent(TRACE_ID, SPAN_ID, True, "team=a,vendor@sys=x-1")
    unsampled = trace_context.extract({"traceparent": TRACEPARENT[:-2] + "00"})
    assert unsampled is not None and not unsampled.sampled and unsampled.tracestate == ""
    # A later version may add fields, which are ignored
    assert trace_context.extract({"traceparent": "01" + TRACEPARENT[2:] + "-more"}) is not None


@pytest.mark.parametrize("value", [
    "", "garbage", TRACEPARENT.upper(), TRACEPARENT + "-extra",  # 00 has four fields
    "ff" + TRACEPARENT[2:], "00-" + "0" * 32 + "-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01",
    "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01"])
def test_a_malformed_traceparent_is_ignored(value: str) -> None:
    assert trace_context.extract({"traceparent": value}) is None


@pytest.mark.parametrize("value", [
    "=" * 600, "a=1,a=2", "Upper=1", "a=", "a=b=c,", ",".join(f"k{i}=v" for i in range(33))])
def test_a_malformed_tracestate_is_dropped_whole(value: str) -> None:
    parent = trace_context.extract({"traceparent": TRACEPARENT, "tracestate": value})
    assert parent is not None and parent.tracestate == ""


def test_the_traceparent_sent_on() -> None:
    assert trace_context.traceparent(TRACE_ID, SPAN_ID, True) == TRACEPARENT
    assert trace_context.traceparent(1, 2, False) == f"00-{1:032x}-{2:016x}-00"


# ---- sampling ----------------------------------------------------------------------------

@pytest.mark.parametrize("ratio, client_flag, traced", [
    (0.0, True, False),  # a client's sampled flag does not force tracing
    (1.0, False, True),  # nor does clearing it hide the request
])
def test_the_gateway_decides_whatever_the_client_flags(
        monkeypatch: pytest.MonkeyPatch, ratio: float, client_flag: bool,
        traced: bool) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", str(ratio))
    assert from_environment("gateway").decide(client_flag) is traced


def test_behind_the_gateway_a_request_follows_its_caller(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.0")
    worker = from_environment("worker")
    assert worker.decide(True) and not worker.decide(False)
    assert not worker.decide(None)  # no caller: by the ratio
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    assert from_environment("worker").decide(False)  # not parent-based


def test_a_client_cannot_pick_a_trace_id_that_is_always_traced(
        spans: Collected, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ratio is a draw per request: not a function of the trace id, which a client
    chooses (low bits all zero would pass any trace-id ratio test)."""
    monkeypatch.setattr(tracing, "_SAMPLING", Sampling(0.1, follow_caller=False))
    chosen = {"traceparent": "00-0af7651916cd43dd0000000000000000-b7ad6b7169203331-01"}
    starts = [tracing.start("root", chosen) for _ in range(2000)]
    traced = sum(1 for trace in starts if trace is not None and trace.sampled)
    assert 100 < traced < 320  # about 200


def test_the_sampler_comes_from_opentelemetrys_variables(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    assert from_environment("worker") == Sampling(1.0, follow_caller=True)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.01")
    assert from_environment("gateway") == Sampling(0.01, follow_caller=False)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "lots")
    assert from_environment("gateway").ratio == 1.0
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    assert from_environment("worker") == Sampling(0.0, follow_caller=False)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "jaeger_remote")  # not supported: the default
    assert from_environment("worker") == Sampling(1.0, follow_caller=True)


# ---- spans -------------------------------------------------------------------------------

class Collected:
    """Stands in for the span shipper: the records of ended spans."""

    def __init__(self) -> None:
        self.records: list[tuple[Any, ...]] = []

    def add(self, span: span_export.Ended) -> None:
        self.records.append(span.record())

    def named(self, name: str) -> tuple[Any, ...]:
        return next(r for r in self.records if r[0] == name)


@pytest.fixture()
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[Collected]:
    collected = Collected()
    monkeypatch.setattr(tracing, "ENABLED", True)
    monkeypatch.setattr(tracing, "_EXPORT", collected)
    monkeypatch.setattr(tracing, "_SAMPLING", Sampling(1.0, follow_caller=False))
    yield collected


def test_a_clients_trace_is_continued(spans: Collected) -> None:
    trace = tracing.start("root", {"traceparent": TRACEPARENT, "tracestate": "team=a"})
    assert trace is not None and trace.trace_id == TRACE_ID
    with trace.child("attempt", client=True):
        sent: dict[str, str] = {}
        trace.inject(sent)
    trace.root.end()
    root, attempt = spans.named("root"), spans.named("attempt")
    # name, trace id, span id, parent id, parent is remote, kind, ... tracestate
    assert root[1:2] + root[3:6] == (TRACE_ID, SPAN_ID, True, tracing.SERVER)
    assert attempt[3:6] == (root[2], False, tracing.CLIENT)
    assert sent == {"traceparent": trace_context.traceparent(TRACE_ID, attempt[2], True),
                    "tracestate": "team=a"}


def test_an_unsampled_request_records_nothing_and_says_so_downstream(
        spans: Collected, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "_SAMPLING", Sampling(0.0, follow_caller=False))
    trace = tracing.start("root", {"traceparent": TRACEPARENT})
    assert trace is not None and not trace.sampled and trace.link is None
    with trace.child("attempt") as span:
        span.set_attribute("a", 1)
        sent: dict[str, str] = {}
        trace.inject(sent)
    trace.record("slot wait", 1.0, 2.0)
    tracing.close(trace.open("stream"), {"b": 2}, "broke off")
    trace.root.end()
    assert spans.records == []
    assert sent["traceparent"] == TRACEPARENT[:-2] + "00"  # the same trace, not sampled


def test_a_failed_block_marks_its_span(spans: Collected) -> None:
    trace = tracing.start("root", None)
    assert trace is not None
    with pytest.raises(KeyError):
        with trace.child("attempt"):
            raise KeyError("gone")
    attempt = spans.named("attempt")
    assert attempt[8]["error.type"] == "KeyError" and "gone" in attempt[9]


def test_a_block_whose_exception_has_no_text_still_ends_its_span(spans: Collected) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text")
    trace = tracing.start("root", None)
    assert trace is not None
    with pytest.raises(RuntimeError):
        with trace.child("attempt"):
            raise Unprintable()
    with trace.child("after"):
        pass
    root = trace.root
    assert isinstance(root, tracing.Span)
    assert spans.named("attempt")[8]["error.type"] == "Unprintable"
    assert spans.named("after")[3] == root.span_id  # not under the attempt that failed


def test_concurrent_attempts_of_one_request_each_hang_under_its_root(
        spans: Collected) -> None:
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
            assert isinstance(span, tracing.Span) and f"{span.span_id:016x}" in sent[name]
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(attempt, n))
               for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with trace.child("after"):
        pass
    trace.root.end()
    root = spans.named("root")
    assert root[3] == 0  # a root of our own
    assert [spans.named(n)[3] for n in ("a", "b", "after")] == [root[2]] * 3
    assert sent["a"] != sent["b"]


def test_a_finished_requests_spans_are_freed_without_the_collector(
        spans: Collected) -> None:
    """A request's trace and spans leave no loop behind: freed when the request ends, not
    by a later pass of the collector (whose older passes grew with every traced stream)."""
    trace_id = random.getrandbits(128) | 1  # (other tests' objects may still be about)

    def left() -> list[object]:
        # (type(), not isinstance: some objects of other libraries warn when asked)
        return [o for o in gc.get_objects() if type(o) in (tracing.Trace, tracing.Span)
                and o.trace_id == trace_id]
    gc.disable()
    try:
        trace = tracing.start(
            "root", {"traceparent": trace_context.traceparent(trace_id, SPAN_ID, True)},
            {"a": 1})
        assert trace is not None
        with trace.child("attempt", client=True) as attempt:
            attempt.set_attribute("b", 2)
            trace.inject({})
        stream = trace.open("stream")
        trace.record("slot wait", 1.0, 2.0)
        tracing.close(stream, {"c": 3})
        assert len(left()) == 4  # the trace, its root, and the two spans named here
        trace.root.end()
        del trace, attempt, stream
        assert left() == []
    finally:
        gc.enable()


def test_a_usage_write_links_to_the_traced_requests_only(spans: Collected) -> None:
    with tracing.background("usage write", [None, None]) as nothing:
        assert nothing is None  # no traced request: no span
    with tracing.background("usage write", [(TRACE_ID, SPAN_ID), None], {"n": 2}):
        pass
    write = spans.named("usage write")
    assert write[1] != TRACE_ID and write[3] == 0 and write[10] == [(TRACE_ID, SPAN_ID)]


# ---- the export helper's side ----------------------------------------------------------

def test_a_record_becomes_an_otlp_span(spans: Collected) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.common")
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from app.telemetry.export_process import _Builder

    trace = tracing.start("POST /v1/chat/completions",
                          {"traceparent": TRACEPARENT, "tracestate": "team=a"}, {"a": "x"})
    assert trace is not None
    with trace.child("upstream attempt", {"server.address": "w1", "odd": object()},
                     client=True) as attempt:
        attempt.fail("HTTP 503")
    tracing.close(trace.root, {"http.response.status_code": 503, "long": "y" * 10000})
    build = _Builder("llm", "gateway")
    request = encode_spans([build(record) for record in spans.records])
    scope_spans = request.resource_spans[0].scope_spans[0]
    resource = {a.key: a.value.string_value
                for a in request.resource_spans[0].resource.attributes}
    assert resource["service.name"] == "llm-gateway"
    by_name = {span.name: span for span in scope_spans.spans}
    root, attempt_span = by_name["POST /v1/chat/completions"], by_name["upstream attempt"]
    assert root.trace_id == TRACE_ID.to_bytes(16, "big")
    assert root.parent_span_id == SPAN_ID.to_bytes(8, "big") and root.trace_state == "team=a"
    assert attempt_span.parent_span_id == root.span_id
    assert attempt_span.status.code == 2 and attempt_span.status.message == "HTTP 503"
    assert attempt_span.kind == 3  # OTLP's CLIENT (the SDK's kind + 1)
    attributes = {a.key: a.value for a in attempt_span.attributes}
    assert "odd" not in attributes  # a value OTLP has no type for is left out
    root_attributes = {a.key: a.value for a in root.attributes}
    assert len(root_attributes["long"].string_value) == 4096


class Ended:
    def __init__(self, record: tuple[Any, ...]) -> None:
        self._record = record

    def record(self) -> tuple[Any, ...]:
        return self._record


def test_a_full_queue_drops_and_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    dropped: list[int] = []
    shipper = span_export.SpanShipper("", "flaskchat", "gateway", dropped=dropped.append,
                                      max_queue=3, max_batch=100)
    monkeypatch.setattr(shipper, "_started", True)  # no sending thread: nothing leaves
    for n in range(5):
        shipper.add(Ended(("span", n)))
    assert dropped == [1, 1] and shipper.dropped == 2 and len(shipper._queue) == 3


# ---- other pure helpers ------------------------------------------------------------------

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


def test_a_value_marshal_cannot_write_leaves_only_its_attribute_out() -> None:
    record: tuple[Any, ...] = ("span", 1, 2, 0, False, 0, 1, 2,
                               {"a": 1, "odd": object(), "s": "x"}, None, [], "")
    plain = span_export._plain(record)
    assert plain[8] == {"a": 1, "s": "x"} and plain[:8] == record[:8] and plain[9:] == record[9:]


def test_a_fork_starts_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a fork (gunicorn's workers) the parent's sending thread, helper and queued
    spans are not the child's: its first span starts its own."""
    shipper = span_export.SpanShipper("", "flaskchat", "gateway", dropped=lambda n: None)
    monkeypatch.setattr(shipper, "_start_thread", lambda: setattr(shipper, "_started", True))
    shipper.add(Ended(("span", 1)))
    assert shipper._started and len(shipper._queue) == 1
    shipper._forked()  # what os.register_at_fork runs in the child
    assert not shipper._started and not shipper._queue and shipper._socket is None
    shipper.add(Ended(("span", 2)))
    assert shipper._started and shipper._take() == [("span", 2)]


def test_a_made_up_http_method_is_not_a_span_name(spans: Collected) -> None:
    from flask import Flask, g

    from app.web import calls

    with Flask(__name__).test_request_context("/v1/models", method="X" * 5000):
        calls._start()
        g.call.trace.root.end()
    (record,) = spans.records
    assert record[0] == "_OTHER unmatched" and record[8]["http.request.method"] == "_OTHER"


def test_an_upstreams_address_keeps_its_credentials_out() -> None:
    class Target:
        base_url = "https://user:s3cret@llm.example/v1"
    assert tracing.address(Target()) == "https://llm.example/v1"
    assert tracing.address("http://127.0.0.1:21002") == "http://127.0.0.1:21002"


def test_an_int_beyond_otlps_range_becomes_text() -> None:
    pytest.importorskip("opentelemetry.sdk")
    from app.telemetry.export_process import _clean

    assert _clean({"big": 1 << 70, "n": 3, "b": True, "f": 0.5}) == \
        {"big": str(1 << 70), "n": 3, "b": True, "f": 0.5}


def test_a_helper_that_keeps_dying_is_started_less_and_less_often() -> None:
    shipper = span_export.SpanShipper("", "flaskchat", "gateway", dropped=lambda n: None)
    waits = []
    for _ in range(8):  # each one dies at once (a setting the exporter refuses, say)
        shipper._started_helper = time.monotonic()
        shipper._lost_helper()
        waits.append(shipper._restart_after)
    assert waits == [10, 20, 40, 80, 160, 300, 300, 300]
    shipper._started_helper = time.monotonic() - 3600  # one that lived long
    shipper._lost_helper()
    assert shipper._restart_after == 10

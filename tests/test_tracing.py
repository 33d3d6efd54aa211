"""OpenTelemetry traces across real processes: the gateway under gunicorn's gevent workers,
our controller, flaskchat's worker (the tiny model) and an OTLP/HTTP receiver started
here. One trace per request, in the right parent/child order and with the attributes
that answer "where did the time go"; a client's traceparent continued; a failover's two
attempts; a collector that is down costs the clients nothing and is counted; no secret
in any span."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
import requests

from tests.conftest import (ROOT, MakeClient, Server, new_database_url, start_controller,
                            start_fake, start_fake_worker, start_gateway, start_on_socket,
                            wait_for)
from tests.otlp_receiver import OtlpReceiver, Span

pytestmark = pytest.mark.worker
pytest.importorskip("torch")
pytest.importorskip("opentelemetry.proto")

from tests.test_worker import tiny_dir  # noqa: E402,F401 - the session's tiny model

# Spans leave every 50 ms (the default is 1 s), so that the tests wait little.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SERVER, CLIENT = 2, 3  # OTLP span kinds


def start_traced_worker(controller: str, model_dir: Path, receiver: str) -> Server:
    return start_on_socket(
        [sys.executable, "-m", "app.cli", "worker", "--fd", "{fd}", "--model-path",
         str(model_dir), "--worker-address", "http://127.0.0.1:{port}", "--controller-address",
         controller, "--heart-beat-interval", "2", "--log-level", "warning", "--model-names",
         "tiny", "--engine", "onnx", "--otlp-traces-endpoint", receiver], "/health",
        env=FAST_EXPORT)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    made = OtlpReceiver()
    yield made
    made.stop()


@pytest.fixture(scope="module")
def stack(receiver: OtlpReceiver, tiny_dir: Path  # noqa: F811
          ) -> Iterator[dict[str, Any]]:
    servers: list[Server] = []
    database = new_database_url()
    made = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "--name",
                           "tracer-key", "--team", "platform", "--json", "--database-url",
                           database], cwd=ROOT, text=True, capture_output=True, timeout=60)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["secret"]
    try:
        controller = start_controller()
        servers.append(controller)
        servers.append(start_traced_worker(controller.url, tiny_dir, receiver.url))
        # Through OpenTelemetry's own variables, as a platform team would set them.
        gateway = start_gateway(controller.url, "--workers", "2", env={
            **FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_SERVICE_NAME": "llm", "FLASKCHAT_DATABASE_URL": database})
        servers.append(gateway)
        wait_for(lambda: "tiny" in requests.get(gateway.url + "/ready").text, 30,
                 "the gateway to see the worker")
        yield {"gateway": gateway, "controller": controller, "key": key}
    finally:
        for server in reversed(servers):
            server.stop()


@pytest.fixture()
def client(stack: dict[str, Any], clients: MakeClient) -> openai.OpenAI:
    return clients(stack["gateway"].url + "/v1", api_key=stack["key"])


def request_trace(receiver: OtlpReceiver, request_id: str, names: set[str]) -> list[Span]:
    """The spans of the trace whose gateway root carries ``request_id``, once every span
    named in ``names`` has arrived."""
    def complete() -> list[Span]:
        roots = receiver.find(lambda s: s.attributes.get("flaskchat.request_id") == request_id
                              and s.service.endswith("-gateway"))
        if not roots:
            return []
        spans = receiver.trace(roots[0].trace_id)
        return spans if names <= {s.name for s in spans} else []
    found: list[Span] = wait_for(complete, 15, f"the spans of {request_id}")
    return found


def one(spans: list[Span], name: str, service: str | None = None) -> Span:
    matching = [s for s in spans if s.name == name and (service is None or s.service == service)]
    assert len(matching) == 1, (name, [(s.name, s.service) for s in spans])
    return matching[0]


def test_a_streamed_chat_is_one_trace_from_the_gateway_to_the_worker(
        client: openai.OpenAI, receiver: OtlpReceiver, stack: dict[str, Any]) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
        stream=True, stream_options={"include_usage": True})
    request_id = raw.headers["x-request-id"]
    chunks = list(raw.parse())
    usage = chunks[-1].usage
    assert usage is not None
    completion_tokens = usage.completion_tokens
    spans = request_trace(receiver, request_id, {
        "POST /v1/chat/completions", "upstream attempt", "stream",
        "POST /worker_generate_stream", "queue", "prompt", "decode"})
    root = one(spans, "POST /v1/chat/completions")
    attempt, stream = one(spans, "upstream attempt"), one(spans, "stream")
    worker = one(spans, "POST /worker_generate_stream")
    # The order: gateway root > attempt > the worker's root > its stages; the stream
    # under the gateway's root.
    assert root.parent_id == "" and root.kind == SERVER
    assert attempt.parent_id == root.span_id and attempt.kind == CLIENT
    assert stream.parent_id == root.span_id
    assert worker.parent_id == attempt.span_id and worker.kind == SERVER
    for stage in ("queue", "prompt", "decode"):
        assert one(spans, stage).parent_id == worker.span_id
    assert {s.service for s in spans} == {"llm-gateway", "flaskchat-worker"}  # its own name
    # What answers "where did the time go".
    assert root.attributes["http.route"] == "/v1/chat/completions"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["gen_ai.request.model"] == "tiny"
    assert root.attributes["flaskchat.key.name"] == "tracer-key"
    assert root.attributes["flaskchat.team"] == "platform"
    assert root.attributes["flaskchat.service_tier"] == "default"
    assert root.attributes["gen_ai.usage.output_tokens"] == completion_tokens
    assert root.attributes["gen_ai.usage.input_tokens"] > 0
    assert root.attributes["flaskchat.ttft_ms"] > 0
    assert attempt.attributes["server.address"].startswith("http://127.0.0.1:")
    assert attempt.attributes["flaskchat.attempt"] == 1
    assert attempt.attributes["flaskchat.ttfb_ms"] >= 0
    assert stream.attributes["flaskchat.stream.end"] == "done"
    assert stream.attributes["gen_ai.usage.output_tokens"] == completion_tokens
    # the first token went out after the answer's head, within the request
    assert attempt.attributes["flaskchat.ttfb_ms"] <= stream.attributes["flaskchat.ttft_ms"] \
        == root.attributes["flaskchat.ttft_ms"]
    prompt, decode = one(spans, "prompt"), one(spans, "decode")
    assert prompt.attributes["gen_ai.usage.input_tokens"] == \
        root.attributes["gen_ai.usage.input_tokens"]
    assert "flaskchat.prompt.cached_tokens" in prompt.attributes
    assert decode.attributes["gen_ai.usage.output_tokens"] == completion_tokens
    assert decode.attributes["flaskchat.batch.peak"] >= 1
    assert worker.attributes["flaskchat.outcome"] in ("stop", "length")
    assert worker.attributes["flaskchat.request_id"] == request_id
    # Children inside their parents' time.
    assert root.start_ns <= attempt.start_ns <= attempt.end_ns <= stream.end_ns <= root.end_ns
    assert prompt.end_ns <= decode.start_ns + 1000
    # The usage batch that recorded the request is a trace of its own, linked to it.
    write = wait_for(lambda: receiver.find(lambda s: s.name == "usage write" and
                                           (root.trace_id, root.span_id) in s.links), 15,
                     "the usage write linked to the request")[0]
    assert write.trace_id != root.trace_id and write.attributes["flaskchat.usage.records"] >= 1


def test_a_clients_traceparent_is_continued(stack: dict[str, Any],
                                            receiver: OtlpReceiver) -> None:
    response = requests.post(stack["gateway"].url + "/v1/chat/completions", timeout=60,
                             headers={"Authorization": f"Bearer {stack['key']}",
                                      "traceparent": TRACEPARENT, "tracestate": "team=a"},
                             json={"model": "tiny", "max_tokens": 4,
                                   "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 200, response.text
    spans = request_trace(receiver, response.headers["X-Request-ID"],
                          {"POST /v1/chat/completions", "POST /worker_generate"})
    root = one(spans, "POST /v1/chat/completions")
    assert root.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert root.parent_id == "b7ad6b7169203331"  # the client's span
    assert one(spans, "POST /worker_generate").trace_id == root.trace_id
    # A client that clears the sampled flag is still traced: the gateway decides (a
    # tenant can neither hide nor force its traces).
    unsampled = TRACEPARENT.replace("6cd43dd8", "6cd43dd9")[:-2] + "00"
    response = requests.post(stack["gateway"].url + "/v1/chat/completions", timeout=60,
                             headers={"Authorization": f"Bearer {stack['key']}",
                                      "traceparent": unsampled},
                             json={"model": "tiny", "max_tokens": 2,
                                   "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 200
    again = request_trace(receiver, response.headers["X-Request-ID"],
                          {"POST /v1/chat/completions", "POST /worker_generate"})
    assert {s.trace_id for s in again} == {"0af7651916cd43dd9448eb211c80319c"}
    # A malformed one starts a trace of the gateway's own, and the request goes on.
    response = requests.post(stack["gateway"].url + "/v1/chat/completions", timeout=60,
                             headers={"Authorization": f"Bearer {stack['key']}",
                                      "traceparent": "00-zz-not-a-trace-" + "x" * 5000,
                                      "tracestate": "=" * 600},
                             json={"model": "tiny", "max_tokens": 2,
                                   "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 200, response.text
    own = request_trace(receiver, response.headers["X-Request-ID"],
                        {"POST /v1/chat/completions"})
    assert one(own, "POST /v1/chat/completions").parent_id == ""


def test_each_of_n_choices_is_in_the_trace(stack: dict[str, Any],
                                           receiver: OtlpReceiver) -> None:
    """n=2 runs two generations at once (in greenlets of their own): both carry the
    request's traceparent, streamed or not."""
    for stream, name in ((False, "POST /worker_generate"),
                         (True, "POST /worker_generate_stream")):
        response = requests.post(stack["gateway"].url + "/v1/chat/completions", timeout=60,
                                 headers={"Authorization": f"Bearer {stack['key']}"},
                                 json={"model": "tiny", "max_tokens": 2, "n": 2,
                                       "stream": stream,
                                       "messages": [{"role": "user", "content": "Hi"}]})
        assert response.status_code == 200, response.text
        request_id = response.headers["X-Request-ID"]

        def both() -> list[Span]:
            spans = request_trace(receiver, request_id, {name})
            return spans if len([s for s in spans if s.name == name]) == 2 else []
        spans = wait_for(both, 15, f"both generations of {request_id}")
        assert len({s.trace_id for s in spans}) == 1


def test_the_access_log_line_names_the_trace(stack: dict[str, Any],
                                             receiver: OtlpReceiver) -> None:
    """The request id is on the root span (above); the trace id is in the access log's
    JSON fields, checked here through a gateway that logs JSON to a file."""
    log = Path(new_database_url().removeprefix("sqlite:///") + ".log")
    with log.open("wb") as written:
        gateway = start_gateway(stack["controller"].url, "--log-format", "json",
                                "--api-keys", "plain-key", env={
                                    **FAST_EXPORT, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT":
                                    receiver.url + "/v1/traces", "FLASKCHAT_LOG_LEVEL": "info"},
                                stderr=written)
    try:
        wait_for(lambda: "tiny" in requests.get(gateway.url + "/ready").text, 30)
        response = requests.post(gateway.url + "/v1/completions", timeout=60,
                                 headers={"Authorization": "Bearer plain-key"},
                                 json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert response.status_code == 200, response.text
        request_id = response.headers["X-Request-ID"]
        spans = request_trace(receiver, request_id, {"POST /v1/completions"})
    finally:
        gateway.stop()
    lines = [json.loads(line) for line in log.read_text().splitlines()
             if line.startswith("{") and request_id in line and "latency_ms" in line]
    assert lines and lines[0]["trace_id"] == spans[0].trace_id
    assert "plain-key" not in log.read_text()


def test_an_openai_compatible_upstream_gets_the_traceparent(
        stack: dict[str, Any], receiver: OtlpReceiver) -> None:
    """vLLM continues a traceparent it receives: the gateway sends its attempt span's."""
    upstream = start_fake("fake_openai.py", "--models", "relayed")
    gateway = start_gateway(stack["controller"].url, "--openai-upstream",
                            f"relayed={upstream.url}/v1", env={
                                **FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
    try:
        response = requests.post(gateway.url + "/v1/chat/completions", timeout=30, json={
            "model": "relayed", "stream": True,
            "messages": [{"role": "user", "content": "Hi"}]})
        assert response.status_code == 200 and b"[DONE]" in response.content
        spans = request_trace(receiver, response.headers["X-Request-ID"],
                              {"POST /v1/chat/completions", "upstream attempt", "stream"})
    finally:
        gateway.stop()
    sent = requests.get(upstream.url + "/fake/log", timeout=5).json()[-1]["traceparent"]
    upstream.stop()
    attempt = one(spans, "upstream attempt")
    assert sent.startswith(f"00-{attempt.trace_id}-{attempt.span_id}-")  # then the flags
    relayed = one(spans, "stream").attributes
    assert relayed["flaskchat.stream.end"] == "done" and relayed["flaskchat.ttft_ms"] > 0


def test_a_failover_shows_two_attempts(stack: dict[str, Any], receiver: OtlpReceiver) -> None:
    """A worker that answers 500 beside the real one: the request that meets it first
    goes on to the other, and its trace holds both attempts (the first failed)."""
    failing = start_fake_worker(stack["controller"].url, "--models", "tiny")
    gateway = stack["gateway"]
    try:
        wait_for(lambda: requests.get(gateway.url + "/ready").json()["workers"].get("tiny")
                 == 2, 30, "both workers in the gateway's list")
        for _ in range(30):  # ties between the workers go at random
            response = requests.post(
                gateway.url + "/v1/chat/completions", timeout=60,
                headers={"Authorization": f"Bearer {stack['key']}"},
                json={"model": "tiny", "max_tokens": 2, "stream": True,
                      "messages": [{"role": "user", "content": "[[http:500]] hi"}]})
            assert response.status_code == 200 and b"[DONE]" in response.content
            spans = request_trace(receiver, response.headers["X-Request-ID"],
                                  {"upstream attempt", "stream"})
            attempts = sorted((s for s in spans if s.name == "upstream attempt"),
                              key=lambda s: s.attributes["flaskchat.attempt"])
            if len(attempts) == 2:
                break
        else:
            pytest.fail("no request met the failing worker first")
        assert attempts[0].status_code == 2  # ERROR
        assert attempts[0].attributes["error.type"]
        assert attempts[0].attributes["server.address"] == failing.url
        assert attempts[1].status_code != 2 and attempts[1].attributes["flaskchat.attempt"] == 2
        assert attempts[1].attributes["server.address"] != failing.url
    finally:
        failing.stop()


def test_no_secret_in_any_span(stack: dict[str, Any], receiver: OtlpReceiver) -> None:
    requests.post(stack["gateway"].url + "/v1/chat/completions", timeout=60,
                  headers={"Authorization": "Bearer fc-wrong-secret-for-the-trace-test"},
                  json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
    wait_for(lambda: receiver.find(lambda s: s.attributes.get("http.response.status_code")
                                   == 401), 15, "the refused request's span")
    every = json.dumps([[s.name, s.attributes] for s in receiver.spans])
    assert stack["key"] not in every and "fc-wrong-secret" not in every
    assert "Bearer" not in every


def test_a_collector_that_is_down_costs_the_clients_nothing(stack: dict[str, Any]) -> None:
    """Spans to a port where nothing listens: every request is answered as usual, and the
    dropped spans are counted on /metrics."""
    down = OtlpReceiver()
    url = down.url
    down.stop()  # nothing listens there now
    gateway = start_gateway(stack["controller"].url, env={
        **FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": url,
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})
    try:
        wait_for(lambda: "tiny" in requests.get(gateway.url + "/ready").text, 30)
        for stream in (False, True, False, True):
            response = requests.post(gateway.url + "/v1/chat/completions", timeout=30,
                                     json={"model": "tiny", "max_tokens": 2, "stream": stream,
                                           "messages": [{"role": "user", "content": "Hi"}]})
            assert response.status_code == 200
        wait_for(lambda: _dropped(gateway) > 0, 30, "the dropped spans to be counted")
    finally:
        gateway.stop()


def _dropped(gateway: Server) -> float:
    for line in requests.get(gateway.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("flaskchat_trace_spans_dropped_total "):
            return float(line.split()[1])
    return 0.0


def test_sigterm_flushes_the_spans_still_queued(stack: dict[str, Any]) -> None:
    """With an export interval far longer than the test, the spans of a request are still
    queued when the gateway is told to stop: they reach the collector before it exits."""
    late = OtlpReceiver()
    gateway = start_gateway(stack["controller"].url, env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": late.url, "OTEL_BSP_SCHEDULE_DELAY": "600000"})
    try:
        wait_for(lambda: "tiny" in requests.get(gateway.url + "/ready").text, 30)
        response = requests.post(gateway.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
        assert response.status_code == 200
        assert not late.spans  # still in the gateway's queue
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(30) == 0
        names = {s.name for s in late.spans}
        assert {"POST /v1/chat/completions", "upstream attempt"} <= names
    finally:
        gateway.stop()
        late.stop()

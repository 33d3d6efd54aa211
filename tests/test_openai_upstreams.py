"""OpenAI-compatible upstreams beside FastChat workers: fake upstreams over real HTTP
(tests/fake_openai.py), our controller and a fake FastChat worker, the gateway under
gunicorn (2 gevent workers), driven by the official client and raw HTTP."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
import requests

from tests.conftest import (ROOT, MakeClient, Server, start_controller, start_fake,
                            start_fake_worker, start_gateway)

UPSTREAM_KEY = "sk-upstream-a-7c1e"
WRONG_KEY = "sk-not-the-right-one"


def start_fake_openai(*args: str) -> Server:
    return start_fake("fake_openai.py", *args)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    started: dict[str, Server] = {}
    try:
        started["controller"] = start_controller()
        started["worker"] = start_fake_worker(started["controller"].url, "--models",
                                              "fastchat-model", "--capabilities",
                                              "length_check,messages")
        started["a"] = start_fake_openai("--models", "up-a-name", "--name", "A",
                                         "--api-key", UPSTREAM_KEY, "--spaced")
        started["b"] = start_fake_openai("--models", "same", "--name", "B")
        started["p1"] = start_fake_openai("--models", "pair", "--name", "P1")
        started["p2"] = start_fake_openai("--models", "pair", "--name", "P2")
        config = tmp_path_factory.mktemp("upstreams") / "upstreams.toml"
        config.write_text(f"""
[[upstream]]
base_url = "{started['a'].url}/v1"
models = {{ renamed = "up-a-name" }}
api_key_env = "UPSTREAM_A_KEY"

[[upstream]]
base_url = "{started['a'].url}/v1"
models = {{ badkey = "up-a-name" }}
api_key_env = "UPSTREAM_WRONG_KEY"

[[upstream]]
base_url = "{started['p1'].url}/v1/"
models = ["pair"]
read_timeout = 2

[[upstream]]
base_url = "{started['p2'].url}/v1"
models = ["pair"]
read_timeout = 2
""")
        started["gateway"] = start_gateway(
            started["controller"].url, "--workers", "2", "--upstreams", str(config),
            "--openai-upstream", f"same={started['b'].url}/v1",
            env={"UPSTREAM_A_KEY": UPSTREAM_KEY, "UPSTREAM_WRONG_KEY": WRONG_KEY,
                 "FLASKCHAT_KEEPALIVE_INTERVAL": "0.5"})
        yield started
    finally:
        for server in reversed(list(started.values())):
            server.stop()


def upstream_log(server: Server) -> list[dict[str, Any]]:
    log: list[dict[str, Any]] = requests.get(server.url + "/fake/log", timeout=5).json()
    return log


def reset(*servers: Server) -> None:
    for server in servers:
        requests.post(server.url + "/fake/reset", timeout=5)


def post(servers: dict[str, Server], path: str, body: dict[str, Any],
         **options: Any) -> requests.Response:
    return requests.post(servers["gateway"].url + path, json=body, timeout=30, **options)


def chat_body(model: str, content: str = "Hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def events(response: requests.Response) -> list[Any]:
    out: list[Any] = []
    for block in response.text.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_models_are_listed_beside_the_controllers(servers: dict[str, Server],
                                                  clients: MakeClient) -> None:
    client = clients(servers["gateway"].url + "/v1")
    ids = [m.id for m in client.models.list().data]
    assert {"fastchat-model", "renamed", "same", "pair", "badkey"} <= set(ids)
    assert client.models.retrieve("renamed").id == "renamed"
    ready = requests.get(servers["gateway"].url + "/ready", timeout=5).json()
    assert {"fastchat-model", "renamed", "pair"} <= set(ready["models"])


def test_chat_through_a_renamed_upstream(servers: dict[str, Server],
                                         clients: MakeClient) -> None:
    reset(servers["a"])
    client = clients(servers["gateway"].url + "/v1")
    reply = client.chat.completions.create(
        model="renamed", messages=[{"role": "user", "content": "Hi"}], temperature=0.2,
        extra_headers={"X-Request-ID": "relay-req-1"})
    assert reply.choices[0].message.content == "Hi from A."
    assert reply.model == "renamed"
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    sent = upstream_log(servers["a"])[-1]
    assert sent["body"]["model"] == "up-a-name" and sent["body"]["temperature"] == 0.2
    assert sent["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent["request_id"] == "relay-req-1"


def test_stream_relayed_with_model_rewritten_and_usage(servers: dict[str, Server],
                                                       clients: MakeClient) -> None:
    client = clients(servers["gateway"].url + "/v1")
    chunks = list(client.chat.completions.create(
        model="renamed", messages=[{"role": "user", "content": "[[reply:one two three]]"}],
        stream=True, stream_options={"include_usage": True}))
    assert {c.model for c in chunks} == {"renamed"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "one two three"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    raw = post(servers, "/v1/chat/completions", chat_body("same", stream=True))
    assert raw.headers["Content-Type"].startswith("text/event-stream")
    assert raw.headers["X-Accel-Buffering"] == "no"
    got = events(raw)
    assert got[-1] == "[DONE]" and got[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in got[:-1]
                   if e["choices"]) == "Hi from B."


def test_tools_and_response_format_pass_through(servers: dict[str, Server],
                                                clients: MakeClient) -> None:
    reset(servers["b"])
    client = clients(servers["gateway"].url + "/v1")
    tools: Any = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    reply = client.chat.completions.create(
        model="same", messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=tools, tool_choice="auto", parallel_tool_calls=False)
    call = reply.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    sent = upstream_log(servers["b"])[-1]["body"]
    assert sent["tools"] == tools and sent["tool_choice"] == "auto"
    assert sent["parallel_tool_calls"] is False
    streamed = list(client.chat.completions.create(
        model="same", messages=[{"role": "user", "content": "Weather?"}], tools=tools,
        stream=True))
    arguments = "".join(c.choices[0].delta.tool_calls[0].function.arguments  # type: ignore
                        or ""
                        for c in streamed if c.choices and c.choices[0].delta.tool_calls)
    assert json.loads(arguments) == {"city": "Paris"}
    schema: Any = {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": {"type": "object",
                                     "properties": {"answer": {"type": "string"}}}}}
    shaped = client.chat.completions.create(
        model="same", messages=[{"role": "user", "content": "Capital of France?"}],
        response_format=schema, seed=42, logprobs=True, top_logprobs=2)
    assert json.loads(shaped.choices[0].message.content or "") == {"answer": "Paris"}
    assert shaped.system_fingerprint == "seed-42"
    assert shaped.choices[0].logprobs is not None
    assert len(shaped.choices[0].logprobs.content[0].top_logprobs) == 2  # type: ignore[index]
    sent = upstream_log(servers["b"])[-1]["body"]
    assert sent["response_format"] == schema and sent["seed"] == 42
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2


def test_fastchat_workers_refuse_what_they_cannot_do(servers: dict[str, Server]) -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    extra: dict[str, Any]
    for extra, param in (({"tools": tools}, "tools"),
                         ({"response_format": {"type": "json_object"}}, "response_format"),
                         ({"logprobs": True, "top_logprobs": 1}, "logprobs"),
                         ({"functions": [{"name": "f"}]}, "functions"),
                         ({"guided_choice": ["a", "b"]}, "guided_choice"),
                         ({"guided_regex": "a+"}, "guided_regex"),
                         ({"guided_json": {"type": "object"}}, "guided_json")):
        response = post(servers, "/v1/chat/completions", chat_body("fastchat-model", **extra))
        assert response.status_code == 400, extra
        error = response.json()["error"]
        assert error["param"] == param and param in error["message"]
    response = post(servers, "/v1/completions", {"model": "fastchat-model", "prompt": "x",
                                                 "guided_regex": "a+"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "guided_regex"
    # Asking for nothing the worker lacks is fine.
    for extra in ({"response_format": {"type": "text"}},
                  {"tools": tools, "tool_choice": "none"}, {"logprobs": False}):
        assert post(servers, "/v1/chat/completions",
                    chat_body("fastchat-model", **extra)).status_code == 200, extra
    # JSON deeper than can be written on (orjson writes 255 levels) is a 400, not a 500.
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    response = post(servers, "/v1/chat/completions", chat_body("same", vendor_extra=deep))
    assert response.status_code == 400 and "deeper" in response.json()["error"]["message"]
    # Malformed feature fields are refused for every model, with the parameter named.
    for extra, param in (({"tools": [{"type": "retrieval"}]}, "tools"),
                         ({"tool_choice": "sometimes"}, "tool_choice"),
                         ({"response_format": {"type": "yaml"}}, "response_format"),
                         ({"top_logprobs": 3}, "top_logprobs"),
                         ({"guided_choice": []}, "guided_choice"),
                         ({"guided_choice": "yes"}, "guided_choice"),
                         ({"guided_json": 3}, "guided_json"),
                         ({"guided_regex": 5}, "guided_regex"),
                         ({"logprobs": True, "top_logprobs": 99}, "top_logprobs")):
        for model in ("fastchat-model", "same"):
            response = post(servers, "/v1/chat/completions", chat_body(model, **extra))
            assert response.status_code == 400, (model, extra)
            assert response.json()["error"]["param"] == param


def test_completions_and_embeddings_are_relayed(servers: dict[str, Server],
                                                clients: MakeClient) -> None:
    client = clients(servers["gateway"].url + "/v1")
    done = client.completions.create(model="renamed", prompt="Once", max_tokens=5)
    assert done.choices[0].text == "Hi from A." and done.model == "renamed"
    pieces = list(client.completions.create(model="renamed", prompt="Once", stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == "Hi from A."
    assert {p.model for p in pieces} == {"renamed"}
    vectors = client.embeddings.create(model="renamed", input=["a", "b"])
    assert vectors.model == "renamed" and len(vectors.data) == 2
    assert vectors.data[1].embedding == [0.25, -0.5, 1.0]
    engine = requests.post(servers["gateway"].url + "/v1/engines/same/embeddings",
                           json={"input": "x"}, timeout=10)
    assert engine.status_code == 200 and engine.json()["model"] == "same"
    token_check = post(servers, "/api/v1/token_check",
                       {"prompts": [{"model": "same", "prompt": "x", "max_tokens": 1}]})
    assert token_check.status_code == 400
    assert token_check.json()["error"]["param"] == "prompts[0].model"


def test_upstream_errors_become_clear_statuses(servers: dict[str, Server]) -> None:
    refused = post(servers, "/v1/chat/completions", chat_body("same", "[[http:400]]"))
    assert refused.status_code == 400
    assert refused.json()["error"] == {"message": "fake failure 400", "param": "messages",
                                       "type": "invalid_request_error", "code": None}
    rule = post(servers, "/v1/chat/completions", chat_body("same", temperature=1.5))
    assert rule.status_code == 400 and rule.json()["error"]["param"] == "temperature"
    ours = post(servers, "/v1/chat/completions", chat_body("same", temperature=5))
    assert ours.status_code == 400 and ours.json()["error"]["param"] == "temperature"
    failing = post(servers, "/v1/chat/completions", chat_body("same", "[[http:500]]"))
    assert failing.status_code == 502 and "HTTP 500" in failing.json()["error"]["message"]
    busy = post(servers, "/v1/chat/completions", chat_body("same", "[[http:429]]"))
    assert busy.status_code == 429 and busy.headers["Retry-After"]
    wrong_key = post(servers, "/v1/chat/completions", chat_body("badkey"))
    assert wrong_key.status_code == 502
    assert "credentials" in wrong_key.json()["error"]["message"]
    assert WRONG_KEY not in wrong_key.text and UPSTREAM_KEY not in wrong_key.text
    missing = post(servers, "/v1/chat/completions", chat_body("not-served-anywhere"))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    # Upstreams recover: the failures above did not take "same" out for good.
    deadline = time.monotonic() + 10
    while post(servers, "/v1/chat/completions", chat_body("same")).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_failures_mid_stream_end_with_an_error_event(servers: dict[str, Server]) -> None:
    for directive, words in (("[[drop]]", "closed the connection"), ("[[error]]", "engine died"),
                             ("[[nodone]]", "before it was complete")):
        response = post(servers, "/v1/chat/completions",
                        chat_body("renamed", directive + "[[reply:a b c d e]]", stream=True))
        assert response.status_code == 200
        got = events(response)
        assert got[-1] == "[DONE]", directive
        error = got[-2]["error"]
        assert words in error["message"], (directive, error)
        assert error["type"] == "server_error"
        if directive != "[[drop]]":  # (a cut may take the last chunks with it)
            assert "".join(e["choices"][0]["delta"].get("content") or ""
                           for e in got[:-2]).startswith("a b ")


def test_hung_upstream_times_out(servers: dict[str, Server]) -> None:
    started = time.monotonic()
    response = post(servers, "/v1/chat/completions", chat_body("pair", "[[hang]]"))
    took = time.monotonic() - started
    # read_timeout 2 s on each of the two upstreams of "pair": one try each.
    assert response.status_code == 504, response.text
    assert took < 10
    started = time.monotonic()
    streamed = post(servers, "/v1/chat/completions", chat_body("pair", "[[hang]]", stream=True))
    assert streamed.status_code == 504  # nothing was sent yet: a plain status
    assert time.monotonic() - started < 10


def test_client_leaving_cancels_the_upstream(servers: dict[str, Server]) -> None:
    reset(servers["b"])
    response = post(servers, "/v1/chat/completions",
                    chat_body("same", "[[slow:0.3]][[reply:" + " ".join("w" * 30) + "]]",
                              stream=True), stream=True)
    chunks = response.iter_content(chunk_size=None)
    received = b""
    while b'"content":"w' not in received:
        received += next(chunks)
    response.close()
    deadline = time.monotonic() + 5
    while requests.get(servers["b"].url + "/fake/stats", timeout=5).json()["cancelled"] < 1:
        assert time.monotonic() < deadline, "the upstream kept generating"
        time.sleep(0.1)


def test_balanced_and_failing_over(servers: dict[str, Server], clients: MakeClient) -> None:
    p1, p2 = servers["p1"], servers["p2"]
    client = clients(servers["gateway"].url + "/v1")

    def ask() -> str | None:
        return client.chat.completions.create(
            model="pair", messages=[{"role": "user", "content": "Hi"}]).choices[0] \
            .message.content

    # An earlier test (the hung upstream) had both marked failed: wait for the probes.
    deadline = time.monotonic() + 15
    while {ask() for _ in range(4)} != {"Hi from P1.", "Hi from P2."}:
        assert time.monotonic() < deadline, "a recovered upstream never took traffic again"
        time.sleep(0.5)
    reset(p1, p2)
    answers = [client.chat.completions.create(
        model="pair", messages=[{"role": "user", "content": "Hi"}]).choices[0].message.content
        for _ in range(12)]
    assert set(answers) == {"Hi from P1.", "Hi from P2."}  # both take traffic
    assert len(upstream_log(p1)) >= 3 and len(upstream_log(p2)) >= 3
    p2.stop()
    try:
        served = [client.chat.completions.create(
            model="pair", messages=[{"role": "user", "content": "Hi"}]).choices[0]
            .message.content for _ in range(12)]
        assert served == ["Hi from P1."] * 12  # the dead one is skipped, unseen by clients
        streamed = list(client.chat.completions.create(
            model="pair", messages=[{"role": "user", "content": "Hi"}], stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
            "Hi from P1."
    finally:
        servers["p2"] = start_fake_openai("--models", "pair", "--name", "P2")


@pytest.mark.parametrize("args, says", [
    (["--openai-upstream", "no-equals-sign"], "expected MODEL=BASE_URL"),
    (["--openai-upstream", "m=ftp://host/v1"], "base URL must be http(s)"),
    (["--upstreams", "/nonexistent/upstreams.toml"], "cannot read it"),
])
def test_bad_upstream_settings_stop_the_server(args: list[str], says: str) -> None:
    result = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--port", "0", *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and says in result.stderr, result.stderr


@pytest.mark.parametrize("text, says", [
    ('[[upstream]]\nbase_url = "http://h/v1"\nmodels = ["m"]\ntimeout = 3\n',
     "unknown key(s) ['timeout']"),
    ('[[upstream]]\nbase_url = "http://h/v1"\n', "models must be"),
    ('[[upstream]]\nbase_url = "http://h/v1"\nmodels = ["m"]\napi_key_env = "NOPE_UNSET"\n',
     "'NOPE_UNSET', which is not set"),
    ('[[upstream]]\nbase_url = "http://h/v1"\nmodels = ["m"]\nweight = 0\n',
     "weight must be a positive number"),
    ("[[upstream]\n", "not valid TOML"),
])
def test_bad_upstream_files_are_explained(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text(text)
    result = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--port", "0",
                             "--upstreams", str(path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and says in result.stderr, result.stderr


def test_upstream_connections_are_reused(servers: dict[str, Server],
                                         clients: MakeClient) -> None:
    """One pooled Session: after warm-up, requests (stream or not) open no connections."""
    client = clients(servers["gateway"].url + "/v1")
    messages: Any = [{"role": "user", "content": "Hi"}]

    def both() -> None:
        client.chat.completions.create(model="same", messages=messages)
        list(client.chat.completions.create(model="same", messages=messages, stream=True))

    for _ in range(3):
        both()  # warm-up: each gateway process opens what it needs
    reset(servers["b"])
    for _ in range(10):
        both()
    stats = requests.get(servers["b"].url + "/fake/stats", timeout=5).json()
    assert stats["requests"] == 20
    assert stats["connections"] <= 2, stats  # the connections already open, reused


def test_demo_page_streams_upstream_models(servers: dict[str, Server]) -> None:
    made = post(servers, "/demo/streams", chat_body("renamed", "[[reply:via the demo]]"))
    assert made.status_code == 201, made.text
    streamed = requests.get(f"{servers['gateway'].url}/{made.json()['url']}", timeout=30)
    got = events(streamed)
    assert got[-1] == "[DONE]" and {e["model"] for e in got[:-1]} == {"renamed"}
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in got[:-1]
                   if e["choices"]) == "via the demo"
    assert any(e.get("usage") for e in got[:-1])  # the page asks for usage (tokens/s)


def test_openai_client_sees_upstream_errors_as_exceptions(servers: dict[str, Server],
                                                          clients: MakeClient) -> None:
    client = clients(servers["gateway"].url + "/v1")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="same",
                                       messages=[{"role": "user", "content": "[[http:400]]"}])
    assert refused.value.status_code == 400
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(
            model="renamed", messages=[{"role": "user", "content": "[[drop]]"}], stream=True))

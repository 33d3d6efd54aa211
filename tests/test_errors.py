"""Every kind of bad input and upstream failure: status, OpenAI envelope, FastChat keys."""
from __future__ import annotations

import time
from typing import Any

import openai
import pytest
import requests

from tests.conftest import API_KEY, MakeClient, Stack, wait_for

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = "/v1/chat/completions"
HI: Any = [{"role": "user", "content": "Hi"}]


def assert_envelope(response: requests.Response, status: int, type_: str | None = None,
                    param: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] is None or isinstance(error["code"], str)
    if type_ is not None:
        assert error["type"] == type_
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    # FastChat's keys for older clients
    assert body["object"] == "error" and body["message"] == error["message"]
    assert isinstance(body["code"], int)
    return body


BAD_REQUESTS: list[tuple[str, Any, int, str | None, str | None]] = [
    # (path, json body, status, param, code)
    (CHAT, {"model": "no-such-model", "messages": HI}, 404, "model", "model_not_found"),
    (CHAT, {"messages": HI}, 400, "model", None),
    (CHAT, {"model": "fake-model"}, 400, "messages", None),
    (CHAT, {"model": "fake-model", "messages": []}, 400, "messages", None),
    (CHAT, {"model": "fake-model", "messages": HI, "temperature": 3}, 400, "temperature", None),
    (CHAT, {"model": "fake-model", "messages": HI, "temperature": -1}, 400, "temperature",
     None),
    (CHAT, {"model": "fake-model", "messages": HI, "temperature": "hot"}, 400, "temperature",
     None),
    (CHAT, {"model": "fake-model", "messages": HI, "top_p": 1.5}, 400, "top_p", None),
    (CHAT, {"model": "fake-model", "messages": HI, "top_k": 0}, 400, "top_k", None),
    (CHAT, {"model": "fake-model", "messages": HI, "n": 0}, 400, "n", None),
    (CHAT, {"model": "fake-model", "messages": HI, "n": 100000}, 400, "n", None),
    (CHAT, {"model": "fake-model", "messages": HI, "max_tokens": 0}, 400, "max_tokens", None),
    (CHAT, {"model": "fake-model", "messages": HI, "max_tokens": 1.5}, 400, "max_tokens",
     None),
    (CHAT, {"model": "fake-model", "messages": HI, "max_tokens": 10**7}, 400, "max_tokens",
     None),
    (CHAT, {"model": "fake-model", "messages": HI * 3000}, 400, "messages", None),
    (CHAT, {"model": "fake-model", "messages": HI, "seed": "9" * 30}, 400, "seed", None),
    ("/v1/completions", {"model": "fake-model", "prompt": "x", "seed": 1e30}, 400, "seed",
     None),
    (CHAT, {"model": "fake-model", "messages": HI, "max_completion_tokens": -3}, 400,
     "max_completion_tokens", None),
    (CHAT, {"model": "fake-model", "messages": HI, "stop": 5}, 400, "stop", None),
    (CHAT, {"model": "fake-model", "messages": HI, "stop": ["a", 1]}, 400, "stop", None),
    (CHAT, {"model": "fake-model", "messages": HI, "presence_penalty": 9}, 400,
     "presence_penalty", None),
    (CHAT, {"model": "fake-model", "messages": HI, "stream": "yes"}, 400, "stream", None),
    (CHAT, {"model": "fake-model", "messages": HI, "stream_options": {"include_usage": True}},
     400, "stream_options", None),
    (CHAT, {"model": "fake-model", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role", None),
    (CHAT, {"model": "fake-model", "messages": [{"content": "x"}]}, 400, "messages[0].role",
     None),
    (CHAT, {"model": "fake-model", "messages": ["hi"]}, 400, "messages[0]", None),
    (CHAT, {"model": "fake-model", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", None),
    (CHAT, {"model": "fake-model", "messages": [
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, 400,
     "messages[0].content[0].type", None),
    (CHAT, {"model": "fake-model", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content", None),
    (CHAT, {"model": "vicuna-stock", "messages": [{"role": "user", "content": "a " * 100}]},
     400, "messages", "context_length_exceeded"),
    ("/v1/completions", {"model": "fake-model", "prompt": []}, 400, "prompt", None),
    ("/v1/completions", {"model": "fake-model", "prompt": [1, 2, 3]}, 400, "prompt", None),
    ("/v1/completions", {"model": "fake-model", "prompt": "x", "best_of": 1, "n": 2}, 400,
     "best_of", None),
    ("/v1/completions", {"model": "fake-model", "prompt": "x", "logprobs": 99}, 400,
     "logprobs", None),
    ("/v1/completions", {"model": "vicuna-stock", "prompt": "a " * 100}, 400, "prompt",
     "context_length_exceeded"),
    ("/v1/embeddings", {"model": "fake-model", "input": []}, 400, "input", None),
    ("/v1/embeddings", {"model": "fake-model", "input": ""}, 400, "input", None),
    ("/v1/embeddings", {"model": "fake-model", "input": ["a", ""]}, 400, "input", None),
    ("/v1/engines/fake-model/embeddings", {"input": [""]}, 400, "input", None),
    ("/v1/embeddings", {"model": "fake-model", "input": ["x"] * 3000}, 400, "input", None),
    ("/v1/completions", {"model": "fake-model", "prompt": ["x"] * 3000}, 400, "prompt", None),
    ("/v1/embeddings", {"model": "fake-model", "input": "x", "encoding_format": "int8"}, 400,
     "encoding_format", None),
    ("/v1/embeddings", {"input": "x"}, 400, "model", None),
    ("/v1/embeddings", {"model": "nope", "input": "x"}, 404, "model", "model_not_found"),
    ("/api/v1/token_check", {"prompts": [{"model": "nope", "prompt": "x", "max_tokens": 1}]},
     404, "model", "model_not_found"),
    ("/api/v1/token_check", {"prompts": [{"model": "fake-model"}]}, 400, "prompts[0].prompt",
     None),
]


@pytest.mark.parametrize("path, body, status, param, code", BAD_REQUESTS)
def test_bad_request(stack: Stack, path: str, body: Any, status: int, param: str | None,
                     code: str | None) -> None:
    response = requests.post(stack.gateway.url + path, headers=AUTH, json=body, timeout=30)
    assert_envelope(response, status, "invalid_request_error", param, code)


def test_fastchat_codes_and_texts(stack: Stack) -> None:
    body = assert_envelope(requests.post(stack.gateway.url + CHAT, headers=AUTH, json={
        "model": "fake-model", "messages": HI, "temperature": 3}), 400, param="temperature")
    assert body["code"] == 40302
    assert body["message"] == "3.0 is greater than the maximum of 2 - 'temperature'"
    body = assert_envelope(requests.post(stack.gateway.url + CHAT, headers=AUTH, json={
        "model": "vicuna-stock", "messages": [{"role": "user", "content": "a " * 100}]}), 400,
        param="messages")
    assert body["code"] == 40303
    assert body["message"].startswith("This model's maximum context length is 64 tokens.")


@pytest.mark.parametrize("data, content_type, status", [
    (b"{not json", "application/json", 400),
    (b"", "application/json", 400),
    (b"[1, 2]", "application/json", 400),
    (b'{"model": 1e999}', "application/json", 400),
    (b"model=x", "application/x-www-form-urlencoded", 415),
    (b"\xff\xfe", "application/json", 400),
])
def test_malformed_bodies(stack: Stack, data: bytes, content_type: str, status: int) -> None:
    response = requests.post(stack.gateway.url + CHAT, data=data,
                             headers={**AUTH, "Content-Type": content_type})
    assert_envelope(response, status, "invalid_request_error")


def test_body_too_large(stack: Stack) -> None:
    big = b'{"model": "fake-model", "messages": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    try:
        response = requests.post(stack.gateway.url + CHAT, data=big,
                                 headers={**AUTH, "Content-Type": "application/json"})
    except requests.ConnectionError:
        pytest.fail("the gateway cut the connection instead of answering 413")
    assert_envelope(response, 413, "invalid_request_error", code="request_too_large")


def test_unknown_route_and_wrong_method(stack: Stack) -> None:
    assert_envelope(requests.get(stack.gateway.url + "/v1/nothing", headers=AUTH), 404)
    response = requests.get(stack.gateway.url + CHAT, headers=AUTH)
    assert_envelope(response, 405)
    assert "POST" in response.headers["Allow"]


MODEL_ROUTES = [("GET", "/v1/models"), ("GET", "/v1/models/fake-model"),
                ("POST", CHAT), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
                ("POST", "/v1/engines/fake-model/embeddings"),
                ("POST", "/api/v1/token_check"), ("POST", "/api/v1/chat/completions")]


@pytest.mark.parametrize("method, path", MODEL_ROUTES)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Basic dGVzdA==",
                                           "Bearer ", f"Bearer {API_KEY}x"])
def test_auth_on_every_model_route(stack: Stack, method: str, path: str,
                                   authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = requests.request(method, stack.gateway.url + path, headers=headers,
                                json={"model": "fake-model"})
    body = assert_envelope(response, 401, "invalid_request_error", code="invalid_api_key")
    assert API_KEY not in response.text and "wrong-key" not in response.text
    assert body["code"] == 40101


def test_auth_accepts_every_configured_key_and_health_is_open(stack: Stack) -> None:
    for key in (API_KEY, "second-key"):
        response = requests.get(stack.base_url + "/models",
                                headers={"Authorization": f"bearer {key}"})
        assert response.status_code == 200
    assert requests.get(stack.gateway.url + "/health").json()["status"] == "ok"
    ready = requests.get(stack.gateway.url + "/ready")
    assert ready.status_code == 200 and "fake-model" in ready.json()["models"]


def test_openai_client_sees_typed_errors(stack: Stack, clients: MakeClient) -> None:
    client = clients(stack.base_url, "bad")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    client = clients(stack.base_url, API_KEY)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="fake-model", messages=HI, temperature=5)
    assert info.value.param == "temperature"


# ---- worker failures before the first byte ------------------------------------------------

@pytest.mark.parametrize("directive, status, code, stream", [
    ("[[http:500]]", 502, "bad_gateway", False),
    ("[[http:500]]", 502, "bad_gateway", True),
    ("[[http:503]]", 503, None, False),
    ("[[http:503]]", 503, None, True),
    ("[[hang]]", 504, "upstream_timeout", False),
    ("[[hang]]", 504, "upstream_timeout", True),
    # non-stream only: in a stream these come after the first byte (see test_streaming)
    ("[[error:50002]]", 503, "worker_out_of_memory", False),
    ("[[error:50001]]", 502, "bad_gateway", False),
])
def test_worker_failures_have_gateway_statuses(stack: Stack, directive: str, status: int,
                                               code: str | None, stream: bool) -> None:
    started = time.monotonic()
    response = requests.post(stack.gateway.url + CHAT, headers=AUTH, timeout=30, json={
        "model": "vicuna-stock", "stream": stream,
        "messages": [{"role": "user", "content": directive}]})
    assert_envelope(response, status, "server_error", code=code)
    assert time.monotonic() - started < 15


def test_unreachable_worker_is_503(stack: Stack) -> None:
    from tests.conftest import start_fake_worker
    doomed = start_fake_worker(stack.controller.url, "--models", "doomed-model")
    try:
        # Listed by both gateway processes (each request may land on either).
        wait_for(lambda: all("doomed-model" in requests.get(
            stack.base_url + "/models", headers=AUTH).text for _ in range(6)))
        doomed.stop()
        for stream in (False, True):
            response = requests.post(stack.gateway.url + CHAT, headers=AUTH, timeout=30,
                                     json={"model": "doomed-model", "messages": HI,
                                           "stream": stream})
            assert_envelope(response, 503, "server_error")
    finally:
        doomed.stop()

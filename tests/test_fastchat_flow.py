"""A stock FastChat-style flow: our gateway and controller, a worker that speaks only
FastChat's protocol (no capabilities; it ignores the messages field). The prompt it gets
must be FastChat's rendering of its template, and the calls per request must be few."""
from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import API_KEY, MakeClient, Stack

MESSAGES: Any = [{"role": "system", "content": "Answer briefly."},
                 {"role": "user", "content": "Hello!"},
                 {"role": "assistant", "content": "Hi there."},
                 {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def client(stack: Stack, clients: MakeClient) -> openai.OpenAI:
    return clients(stack.base_url, API_KEY)


@pytest.mark.parametrize("model, prompt", [
    ("vicuna-stock",
     "Answer briefly. USER: Hello! ASSISTANT: Hi there.</s>USER: What is 2+2? ASSISTANT:"),
    ("llama2-stock",
     "[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nHello! [/INST] Hi there. </s><s>[INST] "
     "What is 2+2? [/INST]"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_worker_receives_fastchat_prompt(client: openai.OpenAI, stack: Stack, model: str,
                                         prompt: str, stream: bool) -> None:
    stack.reset_worker(model)
    result = client.chat.completions.create(model=model, messages=MESSAGES, stream=stream)
    if stream:
        list(result)
    log = stack.worker_log(model)
    generation = [e for e in log if e["path"].startswith("/worker_generate")]
    assert len(generation) == 1
    params = generation[0]["body"]
    assert params["prompt"] == prompt
    assert params["stop"] == [] and params["stop_token_ids"] is None
    assert params["temperature"] == 0.7 and params["top_p"] == 1.0 and params["top_k"] == -1
    assert params["echo"] is False
    # count_token ran on the same prompt; the budget keeps one token back
    count = [e for e in log if e["path"] == "/count_token"][-1]["body"]
    assert count == {"model": model, "prompt": prompt}
    assert params["max_new_tokens"] == (64 if model == "vicuna-stock" else 2048) \
        - (len(prompt.split()) + 1) - 1


def test_sampling_defaults_are_left_to_a_worker_that_has_them(
        client: openai.OpenAI, stack: Stack) -> None:
    """A worker listing sampling_defaults gets no temperature/top_p/top_k the client left
    out (it applies its model's own); what the client sets is sent as it is."""
    stack.reset_worker("defaults-model")
    client.chat.completions.create(model="defaults-model", messages=MESSAGES)
    client.completions.create(model="defaults-model", prompt="Hi", temperature=0.3, top_p=0.5)
    chat, completion = [e["body"] for e in stack.worker_log("defaults-model")
                        if e["path"].startswith("/worker_generate")]
    assert not {"temperature", "top_p", "top_k"} & set(chat)
    assert completion["temperature"] == 0.3 and completion["top_p"] == 0.5
    assert "top_k" not in completion


def test_template_stop_strings_are_merged(client: openai.OpenAI, stack: Stack) -> None:
    stack.reset_worker("qwen-stock")
    client.chat.completions.create(model="qwen-stock", stop=["END"],
                                   messages=[{"role": "user", "content": "Hi"}])
    params = [e for e in stack.worker_log("qwen-stock")
              if e["path"] == "/worker_generate"][-1]["body"]
    assert sorted(params["stop"]) == ["<|endoftext|>", "END"]
    assert params["stop_token_ids"] == [151643, 151644, 151645]
    assert params["prompt"].startswith("<|im_start|>system\nYou are a helpful assistant.")


@pytest.mark.parametrize("model, calls_per_request", [
    ("fake-model", ["/worker_generate"]),  # checks the length itself: one call
    ("vicuna-stock", ["/count_token", "/worker_generate"]),  # stock worker: two
])
def test_backend_calls_per_request_in_steady_state(client: openai.OpenAI, stack: Stack,
                                                   model: str,
                                                   calls_per_request: list[str]) -> None:
    for _ in range(4):  # warm both gunicorn workers' caches and pools
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "a"}])
    stack.reset_worker(model)
    requests_made = 20
    for _ in range(requests_made):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "a"}])
    log = stack.worker_log(model)
    assert [e["path"] for e in log] == calls_per_request * requests_made
    assert all(e["request_id"] for e in log)
    # Pooled keep-alive connections: no new TCP connection per request.
    assert stack.worker_stats(model)["connections"] <= 4

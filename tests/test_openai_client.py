"""Conformance with the official openai client against the gateway under gunicorn+gevent."""
from __future__ import annotations

import base64
import struct
from typing import Any

import openai
import pytest
import requests

from tests.conftest import API_KEY, MakeClient, Stack
from tests.fake_data import DEFAULT_REPLY, vector


@pytest.fixture(scope="module")
def client(stack: Stack, clients: MakeClient) -> openai.OpenAI:
    return clients(stack.base_url, API_KEY, timeout=30)


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == sorted(ids)
    assert {"fake-model", "vicuna-stock", "llama2-stock"} <= set(ids)
    model = client.models.retrieve("fake-model")
    assert model.id == "fake-model" and model.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.code == "model_not_found"


@pytest.mark.parametrize("model", ["fake-model", "vicuna-stock"])
def test_chat_non_stream(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}])
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == model
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == DEFAULT_REPLY
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 6


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="vicuna-stock", messages=[{"role": "user", "content": "Hi"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    assert all(c.object == "chat.completion.chunk" and c.created > 0 for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == DEFAULT_REPLY
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_n2_stream_interleaves_with_indexes(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fake-model", n=2, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "[[slow:0.05]] go"}])
    texts = {0: "", 1: ""}
    order = []
    finished = set()
    usage = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.delta.content:
                order.append(choice.index)
            if choice.finish_reason:
                finished.add(choice.index)
    assert texts == {0: DEFAULT_REPLY, 1: DEFAULT_REPLY}
    assert finished == {0, 1}
    # Concurrent, not one after the other: index 1 speaks before index 0 is done.
    assert order.index(1) < len(order) - order[::-1].index(0) - 1
    assert usage is not None
    single = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "go"}])
    assert single.usage is not None
    assert usage.prompt_tokens == single.usage.prompt_tokens  # counted once, not n times
    assert usage.completion_tokens == 2 * single.usage.completion_tokens


def test_chat_n2_non_stream(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="vicuna-stock", n=2, messages=[{"role": "user", "content": "Hi"}])
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.message.content == DEFAULT_REPLY for c in reply.choices)
    assert reply.usage is not None and reply.usage.completion_tokens == 12


@pytest.mark.parametrize("stream", [False, True])
def test_stop_is_honoured_when_the_worker_ignores_it(client: openai.OpenAI,
                                                     stream: bool) -> None:
    messages: Any = [{"role": "user", "content": "[[reply:one two STOP three four]]"}]
    if stream:
        chunks = list(client.chat.completions.create(
            model="ignores-stop", messages=messages, stop=["STOP"], stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        reply = client.chat.completions.create(model="ignores-stop", messages=messages,
                                               stop="STOP")
        text = reply.choices[0].message.content or ""
        finish = reply.choices[0].finish_reason
    assert text == "one two "
    assert finish == "stop"


def test_stop_split_across_frames_is_never_streamed(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="ignores-stop", stream=True, stop=["<e n d>"],
        messages=[{"role": "user", "content": "[[reply:keep <e n d> drop]]"}]))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and
              c.choices[0].delta.content]
    assert "".join(deltas) == "keep "
    assert not any("<" in d for d in deltas)


def test_max_tokens_and_max_completion_tokens(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="vicuna-stock", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content == "Hello! I "
    assert reply.choices[0].finish_reason == "length"
    reply = client.chat.completions.create(
        model="vicuna-stock", max_tokens=5, max_completion_tokens=1,
        messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content == "Hello! "


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="vicuna-stock", prompt="Say hi", max_tokens=3)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "Hello! I am "
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    echoed = client.completions.create(model="vicuna-stock", prompt="Say hi", echo=True,
                                       max_tokens=1)
    assert echoed.choices[0].text == "Say hiHello! "


def test_an_empty_prompt_is_a_completion_but_an_empty_input_is_no_embedding(
        client: openai.OpenAI) -> None:
    """As OpenAI: a completion may start from nothing; an embedding of nothing is a 400."""
    assert client.completions.create(model="fake-model", prompt="", max_tokens=2).choices
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="fake-model", input="")
    assert info.value.body["param"] == "input"  # type: ignore[index]


def test_completions_many_prompts_and_n(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="fake-model", prompt=["a", "b c"], n=2,
                                      max_tokens=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    stream = client.completions.create(model="fake-model", prompt=["a", "b c"], n=2,
                                       max_tokens=2, stream=True,
                                       stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    for chunk in stream:
        assert chunk.created > 0 and chunk.object == "text_completion"
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {i: "Hello! I " for i in range(4)}


def test_completions_stream_logprobs_are_per_chunk(client: openai.OpenAI) -> None:
    stream = client.completions.create(model="vicuna-stock", prompt="x", max_tokens=3,
                                       logprobs=1, stream=True)
    tokens = []
    for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.tokens:
                tokens.extend(choice.logprobs.tokens)
    assert tokens == ["Hello! ", "I ", "am "]


@pytest.mark.parametrize("encoding_format", [None, "float", "base64"])
def test_embeddings(client: openai.OpenAI, encoding_format: str | None) -> None:
    inputs = [f"text number {i}" for i in range(9)]  # three batches of four at most
    if encoding_format is None:  # the client asks for base64 and decodes it itself
        result = client.embeddings.create(model="fake-model", input=inputs)
    else:
        result = client.embeddings.create(model="fake-model", input=inputs,
                                          encoding_format=encoding_format)  # type: ignore
    assert [d.index for d in result.data] == list(range(9))
    for item, text in zip(result.data, inputs):
        got = item.embedding
        if isinstance(got, str):
            got = list(struct.unpack("<384f", base64.b64decode(got)))
        assert got == pytest.approx(vector(text, 384), abs=1e-6)
    assert result.usage.prompt_tokens == sum(len(t.split()) + 1 for t in inputs)


def test_embeddings_base64_is_little_endian_float32(stack: Stack) -> None:
    body = requests.post(stack.base_url + "/embeddings", headers={
        "Authorization": f"Bearer {API_KEY}"}, json={
        "model": "fake-model", "input": "hello", "encoding_format": "base64"}).json()
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert len(raw) == 384 * 4
    assert list(struct.unpack("<384f", raw)) == pytest.approx(vector("hello", 384), abs=1e-6)


def test_engine_embeddings_route(stack: Stack) -> None:
    response = requests.post(stack.base_url + "/engines/fake-model/embeddings",
                             headers={"Authorization": f"Bearer {API_KEY}"},
                             json={"input": ["a", "b"]})
    assert response.status_code == 200
    assert response.json()["model"] == "fake-model"
    assert len(response.json()["data"]) == 2


def test_fastchat_api_routes(stack: Stack) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    check = requests.post(stack.gateway.url + "/api/v1/token_check", headers=auth, json={
        "prompts": [{"model": "vicuna-stock", "prompt": "a b c", "max_tokens": 10},
                    {"model": "vicuna-stock", "prompt": "a b c", "max_tokens": 1000}]})
    assert check.status_code == 200
    assert check.json() == {"prompts": [
        {"fits": True, "tokenCount": 4, "contextLength": 64},
        {"fits": False, "tokenCount": 4, "contextLength": 64}]}
    chat = requests.post(stack.gateway.url + "/api/v1/chat/completions", headers=auth, json={
        "model": "vicuna-stock", "messages": [{"role": "user", "content": "Hi"}],
        "repetition_penalty": 1.2})
    assert chat.status_code == 200
    assert chat.json()["choices"][0]["message"]["content"] == DEFAULT_REPLY
    sent = [e for e in stack.worker_log("vicuna-stock") if e["path"] == "/worker_generate"]
    assert sent[-1]["body"]["repetition_penalty"] == 1.2


def test_messages_variants_accepted(client: openai.OpenAI, stack: Stack) -> None:
    stack.reset_worker("llama2-stock")
    reply = client.chat.completions.create(model="llama2-stock", messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is"},
                                     {"type": "text", "text": "the weather?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ])
    assert reply.choices[0].message.content == DEFAULT_REPLY
    prompt = [e for e in stack.worker_log("llama2-stock")
              if e["path"] == "/worker_generate"][-1]["body"]["prompt"]
    assert prompt.startswith("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is\nthe weather? ")
    assert prompt.endswith("[INST] sunny [/INST]")


def test_image_parts_go_to_vision_workers_as_images(client: openai.OpenAI,
                                                    stack: Stack) -> None:
    stack.reset_worker("vision-model")
    client.chat.completions.create(model="vision-model", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
    body = [e for e in stack.worker_log("vision-model")
            if e["path"] == "/worker_generate"][-1]["body"]
    assert body["images"] == ["iVBORw0KGgo="]
    assert "USER: $$<image>$$<image>\nWhat is this? ASSISTANT:" in body["prompt"]

"""Stock FastChat 0.2.36 on either side of ours.

- our gateway in front of FastChat's controller (workers registered there);
- FastChat's openai_api_server in front of our controller;
- our prompt rendering against FastChat's Conversation.get_prompt for every template it
  ships.
FastChat is installed once into .venvs/fastchat (tests/fastchat_venv.py).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
import requests

from app.serving.prompt import render
from tests import fastchat_venv
from tests.conftest import (MakeClient, Server, start_controller, start_fake_worker,
                            start_gateway, wait_until_up)
from tests.fake_data import DEFAULT_REPLY

pytestmark = pytest.mark.fastchat


@pytest.fixture(scope="session")
def fastchat_python() -> str:
    return fastchat_venv.ensure()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_fastchat(python: str, module: str, tmp: Path, *args: str, probe: str) -> Server:
    port = free_port()
    process = subprocess.Popen(
        [python, "-m", module, "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=tmp, env={**os.environ, "LOGDIR": str(tmp)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url, process, probe)
    return Server(url, process)


@pytest.fixture(scope="module")
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in reversed(started):
        server.stop()


def test_our_gateway_in_front_of_fastchat_controller(
        fastchat_python: str, tmp_path: Path, servers: list[Server],
        clients: MakeClient) -> None:
    controller = start_fastchat(fastchat_python, "fastchat.serve.controller", tmp_path,
                                probe="/test_connection")
    servers.append(controller)
    servers.append(start_fake_worker(controller.url, "--models", "stock-a",
                                     "--conv-template", "vicuna_v1.1"))
    worker = start_fake_worker(controller.url, "--models", "modern-b",
                               "--capabilities", "length_check,messages")
    servers.append(worker)
    gateway = start_gateway(controller.url)
    servers.append(gateway)
    client = clients(gateway.url + "/v1")

    assert [m.id for m in client.models.list().data] == ["modern-b", "stock-a"]
    for model in ("stock-a", "modern-b"):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].message.content == DEFAULT_REPLY
        chunks = list(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks
                       if c.choices) == DEFAULT_REPLY
    completion = client.completions.create(model="stock-a", prompt="x", max_tokens=2)
    assert completion.choices[0].text == "Hello! I "
    embedding = client.embeddings.create(model="modern-b", input=["a", "b"])
    assert len(embedding.data) == 2
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="absent",
                                       messages=[{"role": "user", "content": "Hi"}])
    # With a stock controller each request asks it for a worker; the worker itself still
    # sees only the generation (it checks the context length itself).
    requests.post(worker.url + "/fake/reset", timeout=5)
    client.chat.completions.create(model="modern-b",
                                   messages=[{"role": "user", "content": "Hi"}])
    paths = [e["path"] for e in requests.get(worker.url + "/fake/log", timeout=5).json()]
    assert paths == ["/worker_generate"]


def test_fastchat_api_server_in_front_of_our_controller(
        fastchat_python: str, tmp_path: Path, servers: list[Server],
        clients: MakeClient) -> None:
    controller = start_controller()
    servers.append(controller)
    servers.append(start_fake_worker(controller.url, "--models", "stock-c",
                                     "--conv-template", "llama-2"))
    api = start_fastchat(fastchat_python, "fastchat.serve.openai_api_server", tmp_path,
                         "--controller-address", controller.url, probe="/v1/models")
    servers.append(api)
    client = clients(api.url + "/v1")
    assert [m.id for m in client.models.list().data] == ["stock-c"]
    reply = client.chat.completions.create(model="stock-c",
                                           messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content == DEFAULT_REPLY
    chunks = list(client.chat.completions.create(
        model="stock-c", messages=[{"role": "user", "content": "Hi"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks
                   if c.choices) == DEFAULT_REPLY
    assert client.completions.create(model="stock-c", prompt="x",
                                     max_tokens=1).choices[0].text == "Hello! "


DUMP_TEMPLATES = r"""
import dataclasses, json, sys
from fastchat.conversation import conv_templates
cases = json.loads(sys.stdin.read())
out = {}
for name, template in conv_templates.items():
    if template.sep_style is None:  # API-model placeholders, not prompt templates
        continue
    conv_json = dataclasses.asdict(template)
    conv_json["sep_style"] = int(template.sep_style)
    prompts = []
    for messages in cases:
        conv = template.copy()
        try:
            for m in messages:
                if m["role"] == "system":
                    conv.set_system_message(m["content"])
                elif m["role"] == "user":
                    conv.append_message(conv.roles[0], m["content"])
                else:
                    conv.append_message(conv.roles[1], m["content"])
            conv.append_message(conv.roles[1], None)
            prompts.append(conv.get_prompt())
        except Exception as exc:
            prompts.append(None)
    out[name] = {"conv": conv_json, "prompts": prompts}
print(json.dumps(out))
"""

CASES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": "Hi there."},
     {"role": "user", "content": "What is 2+2?\nThink."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
     {"role": "user", "content": "e"}],
    [{"role": "user", "content": "first"}, {"role": "user", "content": "second"},
     {"role": "system", "content": "late system"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "  spaced  "}],
]


def test_rendering_matches_fastchat_for_every_template(fastchat_python: str) -> None:
    result = subprocess.run([fastchat_python, "-c", DUMP_TEMPLATES], input=json.dumps(CASES),
                            capture_output=True, text=True, check=True)
    templates: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(templates) > 70
    compared = 0
    for name, entry in templates.items():
        for messages, expected in zip(CASES, entry["prompts"]):
            if expected is None:
                continue  # FastChat itself fails on this one
            prompt, _ = render(entry["conv"], messages)  # type: ignore[arg-type]
            assert prompt == expected, f"template {name}, messages {messages}"
            compared += 1
    assert compared > 300


@pytest.mark.worker
def test_fastchat_api_server_uses_our_model_worker(
        fastchat_python: str, tmp_path: Path, servers: list[Server],
        clients: MakeClient) -> None:
    """Stock FastChat's API server sends no `messages`: it renders the prompt from the
    template our worker reports (ChatML, as the model's own chat template)."""
    pytest.importorskip("torch")
    from tests.test_worker import start_worker
    from tests.tiny_model import build

    controller = start_controller()
    servers.append(controller)
    worker = start_worker(controller.url, str(build(tmp_path / "tiny")), "--model-names",
                          "tiny-chatml")
    servers.append(worker)
    api = start_fastchat(fastchat_python, "fastchat.serve.openai_api_server", tmp_path,
                         "--controller-address", controller.url, probe="/v1/models")
    servers.append(api)
    client = clients(api.url + "/v1")
    messages: Any = [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi"}]
    reply = client.chat.completions.create(model="tiny-chatml", messages=messages,
                                           max_tokens=6, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model="tiny-chatml", messages=messages,
                                                 max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        reply.choices[0].message.content
    completion = client.completions.create(model="tiny-chatml", prompt="One two",
                                           max_tokens=3, temperature=0)
    assert completion.choices[0].finish_reason == "length"
    # Our gateway sends `messages` and the worker applies the model's own template: the
    # same prompt (same token count), hence the same greedy reply.
    gateway = start_gateway(controller.url)
    servers.append(gateway)
    ours = clients(gateway.url + "/v1")
    direct = ours.chat.completions.create(model="tiny-chatml", messages=messages,
                                          max_tokens=6, temperature=0)
    assert direct.choices[0].message.content == reply.choices[0].message.content
    assert direct.usage is not None and direct.usage.prompt_tokens == reply.usage.prompt_tokens


def test_fastchat_api_server_as_an_openai_upstream(
        fastchat_python: str, tmp_path: Path, servers: list[Server],
        clients: MakeClient) -> None:
    """A real OpenAI-compatible server behind ours: stock FastChat's openai_api_server
    (its own controller and worker), configured as an upstream under another name."""
    behind = start_controller()
    servers.append(behind)
    servers.append(start_fake_worker(behind.url, "--models", "stock-up",
                                     "--conv-template", "vicuna_v1.1", "--context-length",
                                     "256"))
    api = start_fastchat(fastchat_python, "fastchat.serve.openai_api_server", tmp_path,
                         "--controller-address", behind.url, probe="/v1/models")
    servers.append(api)
    config = tmp_path / "upstreams.toml"
    config.write_text(f'[[upstream]]\nbase_url = "{api.url}/v1"\n'
                      'models = { "team-model" = "stock-up" }\n')
    front = start_controller()  # ours: no workers of its own
    servers.append(front)
    gateway = start_gateway(front.url, "--upstreams", str(config))
    servers.append(gateway)
    client = clients(gateway.url + "/v1")
    assert "team-model" in [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(model="team-model",
                                           messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content == DEFAULT_REPLY and reply.model == "team-model"
    chunks = list(client.chat.completions.create(
        model="team-model", messages=[{"role": "user", "content": "Hi"}], stream=True))
    assert {c.model for c in chunks} == {"team-model"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        DEFAULT_REPLY
    completion = client.completions.create(model="team-model", prompt="x", max_tokens=1)
    assert completion.choices[0].text == "Hello! " and completion.model == "team-model"
    streamed = list(client.completions.create(model="team-model", prompt="x", max_tokens=2,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "Hello! I "
    # FastChat's own errors come through as ours: a 400 with its message.
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="team-model", messages=[
            {"role": "user", "content": "word " * 400}])
    assert "maximum context length" in str(refused.value)


def test_fastchat_api_server_uses_our_embedding_worker(
        fastchat_python: str, tmp_path: Path, servers: list[Server],
        clients: MakeClient) -> None:
    """Stock FastChat's API server in front of our embedding worker (onnx engine, dynamic
    batching): its batches of 4 come back in order, as floats and as base64."""
    pytest.importorskip("torch")
    import base64

    import numpy as np

    from tests.test_worker import start_worker

    controller = start_controller()
    servers.append(controller)
    servers.append(start_worker(controller.url, "all-minilm-l6-v2", "--model-names", "minilm"))
    api = start_fastchat(fastchat_python, "fastchat.serve.openai_api_server", tmp_path,
                         "--controller-address", controller.url, probe="/v1/models")
    servers.append(api)
    texts = [f"sentence number {k} about {'cats' if k % 2 else 'taxes'}" for k in range(10)]
    theirs = clients(api.url + "/v1").embeddings.create(model="minilm", input=texts)
    gateway = start_gateway(controller.url)
    servers.append(gateway)
    ours = clients(gateway.url + "/v1").embeddings.create(model="minilm", input=texts)
    a = np.array([d.embedding for d in theirs.data])
    b = np.array([d.embedding for d in ours.data])
    assert a.shape == (10, 384) and np.allclose(a, b, atol=1e-5)
    packed = requests.post(api.url + "/v1/embeddings", timeout=60, json={
        "model": "minilm", "input": texts[:2], "encoding_format": "base64"}).json()
    first = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(first, b[0], atol=1e-5)

"""Structured outputs and tool calls on flaskchat's own worker (llguidance masks each step),
with the tiny random-weight Llama: whatever the weights say, the replies follow the schema,
the regex, the choices or the tool's parameters. In process on both engines, then over
HTTP through the gateway with the official openai client and the OpenAI Agents SDK."""
from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any, Iterator, Literal

import openai
import orjson
import pytest
import requests

from tests.conftest import MakeClient, Server, start_controller, start_gateway, wait_for

pytestmark = pytest.mark.worker
torch = pytest.importorskip("torch")
jsonschema = pytest.importorskip("jsonschema")

from app.errors import InvalidRequest  # noqa: E402
from app.worker.chat_model import ChatModel  # noqa: E402
from tests.test_worker import (ENGINES, load_tiny, params, run, start_worker,  # noqa: E402
                               tiny_dir)

__all__ = ["tiny_dir"]  # the session's tiny model, shared with tests/test_worker.py

PERSON = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "role", "active", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "role": {"enum": ["admin", "user", "guest"]},
                         "active": {"type": "boolean"},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"type": "string", "maxLength": 5}}}}
PERSON_FORMAT: Any = {"type": "json_schema",
                      "json_schema": {"name": "person", "strict": True, "schema": PERSON}}
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
           "properties": {"city": {"type": "string", "maxLength": 12},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "maximum": 10**6},
                      "b": {"type": "integer", "maximum": 10**6}}}
TOOLS: Any = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": ADD}}]
PARAMETERS = {"get_weather": WEATHER, "add": ADD}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module", params=ENGINES)
def tiny(tiny_dir: Path, request: pytest.FixtureRequest) -> ChatModel:
    return load_tiny(tiny_dir, request.param)


def check_calls(calls: list[dict[str, Any]]) -> None:
    assert calls
    for call in calls:
        assert call["id"].startswith("call_") and call["type"] == "function"
        function = call["function"]
        jsonschema.validate(orjson.loads(function["arguments"]), PARAMETERS[function["name"]])


# ---- in process, both engines --------------------------------------------------------------

def test_json_schema_replies_validate_for_ten_seeds(tiny: ChatModel) -> None:
    for seed in range(10):
        final = run(tiny, prompt="Describe a person.", seed=seed, temperature=1.0,
                    max_new_tokens=300, response_format=PERSON_FORMAT)[-1]
        assert final["finish_reason"] == "stop", (seed, final["text"])
        jsonschema.validate(orjson.loads(final["text"]), PERSON)


def test_json_object_replies_parse(tiny: ChatModel) -> None:
    finals = [run(tiny, prompt="{", seed=seed, max_new_tokens=300,
                  response_format={"type": "json_object"})[-1] for seed in range(8)]
    ended = [final for final in finals if final["finish_reason"] == "stop"]
    assert ended  # random weights write long strings: some replies reach max_tokens
    for final in ended:
        assert isinstance(orjson.loads(final["text"]), dict)
    for final in finals:  # cut by max_tokens: "length", as OpenAI says, never a bad stop
        assert final["finish_reason"] in ("stop", "length")
        assert final["text"].startswith("{")


def test_guided_choice_and_regex(tiny: ChatModel) -> None:
    choices = ["yes", "no", "maybe later"]
    for seed in range(5):
        assert run(tiny, prompt="?", seed=seed, guided_choice=choices)[-1]["text"] in choices
        final = run(tiny, prompt="?", seed=seed, guided_regex=r"[0-9]{3}-[a-z]{2,4}")[-1]
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", final["text"]), final["text"]
        assert final["finish_reason"] == "stop"


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "add"}}])
def test_required_and_named_tool_calls_validate(tiny: ChatModel, choice: Any) -> None:
    for seed in range(4):
        frames = run(tiny, messages=ASK, seed=seed, tools=TOOLS, tool_choice=choice,
                     max_new_tokens=400)
        final = frames[-1]
        assert final["finish_reason"] == "tool_calls" and final["text"] == ""
        check_calls(final["tool_calls"])
        if isinstance(choice, dict):
            assert [c["function"]["name"] for c in final["tool_calls"]] == ["add"]
        ids = {c["id"] for frame in frames for c in frame["tool_calls"]}
        assert ids == {c["id"] for c in final["tool_calls"]}  # stable while streaming


def test_one_call_unless_parallel_calls_are_allowed(tiny: ChatModel) -> None:
    for seed in range(4):
        final = run(tiny, messages=ASK, seed=seed, tools=TOOLS, tool_choice="required",
                    parallel_tool_calls=False, max_new_tokens=400)[-1]
        assert len(final["tool_calls"]) == 1
        check_calls(final["tool_calls"])


def test_auto_is_text_or_one_call_when_the_template_knows_no_tools(tiny: ChatModel) -> None:
    """The tiny model's ChatML template has no tools: they are described in a system
    message, and the reply is constrained to text or one call."""
    job = tiny.prepare(params(messages=ASK, tools=TOOLS, tool_choice="auto"))
    assert "<tools>" in job.prompt and '"get_weather"' in job.prompt
    for seed in range(6):
        final = run(tiny, messages=ASK, seed=seed, tools=TOOLS, tool_choice="auto",
                    max_new_tokens=300)[-1]
        if final["tool_calls"]:
            assert final["finish_reason"] == "tool_calls" and len(final["tool_calls"]) == 1
            check_calls(final["tool_calls"])
        else:
            assert not final["text"].startswith("<")


def test_tool_history_renders_through_the_template(tiny: ChatModel) -> None:
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    prompt = tiny.prepare(params(messages=history, tools=TOOLS)).prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}' \
        in prompt
    assert "<tool_response>\nsunny\n</tool_response>" in prompt


# A Qwen-like template that renders tools itself and asks for <tool_call> blocks, and a
# Llama-3.1-like one that asks for a bare JSON call.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t | tojson }}"
    "{% endfor %}\nCall one in <tool_call></tool_call> tags.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_TEMPLATE = HERMES_TEMPLATE.replace(
    "Call one in <tool_call></tool_call> tags.",
    'Reply with {\"name\": function name, \"parameters\": arguments}.').replace(
    "<tool_call>{{ c.function | tojson }}</tool_call>", "{{ c.function | tojson }}")


@pytest.mark.parametrize("template,opening", [(HERMES_TEMPLATE, "<tool_call>\n"),
                                              (LLAMA3_TEMPLATE, "")])
def test_a_template_that_knows_tools_renders_them(tiny_dir: Path, tmp_path: Path,
                                                  template: str, opening: str) -> None:
    """Its tools and history go through the template (no system message of ours), an
    auto reply is free text parsed for calls in the template's format, and a required
    call is written in that format."""
    import shutil

    folder = tmp_path / "tools-template"
    shutil.copytree(tiny_dir, folder)
    (folder / "chat_template.jinja").write_text(template)
    model = load_tiny(folder, "transformers")
    assert model.structured.renders_tools
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    job = model.prepare(params(messages=history, tools=TOOLS, tool_choice="auto"))
    assert '"name": "get_weather"' in job.prompt and "<tools>" not in job.prompt
    assert '"arguments": {"a": 1, "b": 2}' in job.prompt  # parsed for the template
    assert job.constraint is None and job.tool_calls is not None
    frames = run(model, messages=ASK, tools=TOOLS, tool_choice="required", seed=3,
                 parallel_tool_calls=False, max_new_tokens=300)
    final = frames[-1]
    assert final["finish_reason"] == "tool_calls"
    check_calls(final["tool_calls"])


def test_a_template_that_refuses_the_messages_is_a_400(tiny_dir: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "strict-template"
    shutil.copytree(tiny_dir, folder)
    (folder / "chat_template.jinja").write_text(
        "{% if tools %}{{ raise_exception('This template needs a user message first') }}"
        "{% endif %}" + HERMES_TEMPLATE)
    model = load_tiny(folder, "transformers")
    with pytest.raises(InvalidRequest) as refused:
        model.prepare(params(messages=ASK, tools=TOOLS))
    assert refused.value.param == "tools" and "user message first" in refused.value.message


@pytest.mark.parametrize("values,param,named", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
     "response_format", "uniqueItems"),
    ({"guided_json": {"type": "object", "if": {}, "then": {}}}, "guided_json", "'if'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}}}],
      "tool_choice": "required"}, "tools", "uniqueItems"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "unclosed"),
    ({"guided_json": {"type": "object", "properties": {"n": {"type": "integer",
                                                             "minimum": "low"}}}},
     "guided_json", "minimum"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one of"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "nope"),
])
def test_what_cannot_be_enforced_is_refused_naming_it(tiny: ChatModel, values: dict[str, Any],
                                                      param: str, named: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        tiny.prepare(params(prompt="x", **values))
    assert refused.value.param == param and named in refused.value.message


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


@pytest.mark.parametrize("values,param,says", [
    ({"guided_regex": "a" * 2001}, "guided_regex", "2000"),
    ({"guided_choice": ["x" * 1001]}, "guided_choice", "1000"),
    ({"guided_choice": ["x" * 900] * 20}, "guided_choice", "16 KiB"),
    ({"guided_json": nested(40)}, "guided_json", "deeper than 32"),
    ({"guided_json": "{not json"}, "guided_json", "not JSON"),
    ({"guided_json": {"const": "x" * 5000}}, "guided_json", "character by character"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"enum": ["y" * 1001]}}}}, "response_format", "longer"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "description": "d" * 70_000}}}},
     "response_format", "64 KiB"),
    ({"tools": [TOOLS[0]] * 129}, "tools", "128"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": nested(40)}}]},
     "tools", "deeper than 32"),
])
def test_formats_too_big_to_enforce_are_refused_before_any_work(
        values: dict[str, Any], param: str, says: str) -> None:
    """A grammar's literals are matched at every step of the batch a request shares:
    their size is bounded where requests are loaded (the gateway's chat schema and the
    worker's alike). A long description is fine: it is not enforced."""
    from marshmallow import ValidationError

    from schemas.chat import ChatSchema
    from schemas.worker import GenerationSchema

    for schema, body in ((ChatSchema(), {"model": "m", "messages": ASK, **values}),
                         (GenerationSchema(), {"prompt": "x", **values})):
        with pytest.raises(ValidationError) as refused:
            schema.load(body)
        assert param in refused.value.messages and says in str(refused.value.messages)
    described = {"type": "object", "description": "d" * 5000}
    GenerationSchema().load({"prompt": "x", "guided_json": described})


# ---- the onnx engine's batch -----------------------------------------------------------------

@pytest.fixture(scope="module")
def batched(tiny_dir: Path) -> ChatModel:
    return load_tiny(tiny_dir, "onnx", slots=4)


def test_constrained_and_free_rows_share_a_batch(batched: ChatModel) -> None:
    free = dict(prompt="One two three", temperature=0, max_new_tokens=150)
    alone = run(batched, **free)[-1]["text"]
    results: dict[str, Any] = {}

    def work(name: str, **values: Any) -> None:
        results[name] = run(batched, **values)[-1]
    threads = [threading.Thread(target=work, args=("free",), kwargs=free)] + [
        threading.Thread(target=work, args=(f"json{seed}",), kwargs=dict(
            prompt="Describe a person.", seed=seed, max_new_tokens=300,
            response_format=PERSON_FORMAT)) for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results["free"]["text"] == alone  # untouched by its constrained neighbours
    for seed in range(3):
        jsonschema.validate(orjson.loads(results[f"json{seed}"]["text"]), PERSON)


def test_a_grammar_too_slow_to_enforce_fails_its_row_alone(
        batched: ChatModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row whose masks keep taking longer than the budget fails with a clear error (a
    400's code, PARAM_OUT_OF_RANGE); the free row beside it finishes as it would alone."""
    from app.protocol.error_codes import PARAM_OUT_OF_RANGE
    from app.worker.structured import matchers

    free = dict(prompt="One two three", temperature=0, max_new_tokens=120)
    alone = run(batched, **free)[-1]["text"]
    monkeypatch.setattr(matchers, "MASK_BUDGET", -1.0)  # every mask is "too slow"
    results: dict[str, Any] = {}

    def slow() -> None:
        try:
            run(batched, prompt="x", max_new_tokens=200, guided_regex="[a-z]{50}")
        except matchers.GrammarFailed as exc:
            results["failed"] = exc
    threads = [threading.Thread(target=slow), threading.Thread(
        target=lambda: results.setdefault("free", run(batched, **free)[-1]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results["failed"].code == PARAM_OUT_OF_RANGE
    assert "too slow" in str(results["failed"])
    assert results["free"]["text"] == alone
    wait_for(lambda: not batched.engine.batcher._rows,  # type: ignore[attr-defined]
             what="the failed row to be freed")


def test_cancelling_a_constrained_stream_frees_its_row(batched: ChatModel) -> None:
    batcher = batched.engine.batcher  # type: ignore[attr-defined]
    cancel = threading.Event()
    # A regex longer than max_new_tokens can write: the row cannot finish on its own before
    # the test cancels it (json_object let a sampled "{}" end it after two tokens).
    frames = batched.generate(batched.prepare(params(
        prompt="x", max_new_tokens=1800, guided_regex="[a-z]{20000}")), cancel)
    next(frames)
    assert len(batcher._rows) == 1
    cancel.set()
    assert list(frames) == []
    wait_for(lambda: not batcher._rows, what="the cancelled row to be freed")
    final = run(batched, prompt="?", guided_choice=["a", "b"])[-1]  # the row serves again
    assert final["text"] in ("a", "b")


# ---- over HTTP: the gateway, the openai client, the Agents SDK --------------------------------

@pytest.fixture(scope="module")
def stack(tiny_dir: Path) -> Iterator[dict[str, Server]]:
    servers: dict[str, Server] = {}
    try:
        servers["controller"] = start_controller()
        servers["worker"] = start_worker(servers["controller"].url, str(tiny_dir),
                                         "--model-names", "tiny", "--engine", "onnx")
        servers["gateway"] = start_gateway(servers["controller"].url)
        wait_for(lambda: "tiny" in requests.get(servers["gateway"].url + "/ready").text,
                 30, "the gateway to see the worker")
        yield servers
    finally:
        for server in reversed(list(servers.values())):
            server.stop()


@pytest.fixture()
def client(stack: dict[str, Server], clients: MakeClient) -> openai.OpenAI:
    return clients(stack["gateway"].url + "/v1")


def test_json_schema_through_the_openai_client(client: openai.OpenAI) -> None:
    for seed in range(3):
        reply = client.chat.completions.create(
            model="tiny", messages=ASK, seed=seed, max_tokens=300,
            response_format=PERSON_FORMAT)
        jsonschema.validate(orjson.loads(reply.choices[0].message.content or ""), PERSON)
        assert reply.choices[0].finish_reason == "stop"
        text = "".join(chunk.choices[0].delta.content or "" for chunk in
                       client.chat.completions.create(
                           model="tiny", messages=ASK, seed=seed, max_tokens=300,
                           response_format=PERSON_FORMAT,
                           stream=True) if chunk.choices)
        jsonschema.validate(orjson.loads(text), PERSON)


def test_tool_calls_through_the_openai_client(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny", messages=ASK,
                                           tools=TOOLS, tool_choice="required", seed=1,
                                           max_tokens=400)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_calls([call.model_dump() for call in choice.message.tool_calls or []])
    stream = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, seed=1, max_tokens=400,
        stream=True, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls: dict[int, dict[str, Any]] = {}
    finish = []
    for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": delta.id, "type": "function",
                                                  "function": {"name": "", "arguments": ""}})
            if delta.function and delta.function.name:
                call["function"]["name"] = delta.function.name
            if delta.function and delta.function.arguments:
                call["function"]["arguments"] += delta.function.arguments
        finish.append(chunk.choices[0].finish_reason)
    assert finish[-1] == "tool_calls" and len(calls) == 1
    check_calls(list(calls.values()))
    assert calls[0]["function"]["name"] == "get_weather"


def test_vllm_guided_parameters_through_extra_body(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=20,
                                           extra_body={"guided_choice": ["yes", "no"]})
    assert reply.choices[0].message.content in ("yes", "no")
    completion = client.completions.create(model="tiny", prompt="Call me at", max_tokens=20,
                                           extra_body={"guided_regex": r"[0-9]{3}-[0-9]{4}"})
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", completion.choices[0].text)
    data = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=300,
                                          extra_body={"guided_json": WEATHER})
    jsonschema.validate(orjson.loads(data.choices[0].message.content or ""), WEATHER)


def test_an_unsupported_keyword_is_a_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "array", "uniqueItems": True}}})
    assert refused.value.status_code == 400
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "response_format"
    assert "uniqueItems" in error["message"]
    for extra, param, says in (({"guided_regex": "a" * 3000}, "guided_regex", "2000"),
                               ({"functions": [{"name": "f"}]}, "functions", "'tools'"),
                               ({"guided_choice": []}, "guided_choice", "non-empty")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny", messages=ASK, extra_body=extra)
        error = refused.value.body
        assert refused.value.status_code == 400 and isinstance(error, dict)
        assert error["param"] == param and says in error["message"], error


def test_responses_text_format_and_function_tools(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="tiny", input="Describe a person.", max_output_tokens=300,
        text={"format": {"type": "json_schema", "name": "person",
                         "schema": PERSON, "strict": True}})
    jsonschema.validate(orjson.loads(response.output_text), PERSON)
    called = client.responses.create(
        model="tiny", input="Weather in Paris?", max_output_tokens=300, tool_choice="required",
        tools=[{"type": "function", "name": "get_weather",
                "parameters": WEATHER, "strict": True}])
    item = called.output[-1]
    assert item.type == "function_call" and item.name == "get_weather"
    jsonschema.validate(orjson.loads(item.arguments), WEATHER)


def test_the_agents_sdk_runs_a_one_tool_agent(stack: dict[str, Server]) -> None:
    """The model is too small to choose by itself: the first turn requires the tool, the
    SDK runs it, and the agent stops with the tool's output."""
    import asyncio

    from agents import (Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool,
                        set_tracing_disabled)

    set_tracing_disabled(True)  # no export to OpenAI's servers
    seen: list[str] = []

    @function_tool
    def paint(color: Literal["red", "blue"]) -> str:
        """Paints the wall."""
        seen.append(color)
        return f"the wall is {color}"

    async def main() -> Any:
        client = openai.AsyncOpenAI(base_url=stack["gateway"].url + "/v1", api_key="none",
                                    max_retries=0)
        try:
            agent = Agent(name="painter", instructions="Use the tool.", tools=[paint],
                          model=OpenAIResponsesModel("tiny", client),
                          model_settings=ModelSettings(tool_choice="required",
                                                       parallel_tool_calls=False,
                                                       max_tokens=200),
                          tool_use_behavior="stop_on_first_tool")
            return await Runner.run(agent, "Paint the wall red.", max_turns=3)
        finally:
            await client.close()
    result = asyncio.run(main())
    assert len(seen) == 1 and seen[0] in ("red", "blue")
    assert result.final_output == f"the wall is {seen[0]}"

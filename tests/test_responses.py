"""POST /v1/responses and the stored responses, through the official openai client and raw
HTTP: a real gateway under gunicorn, the session's controller and fake workers, keys in
its database."""
from __future__ import annotations

from typing import Any, Iterator

import openai
import pytest
import requests

from tests.conftest import Server, Stack, start_fake, start_gateway, wait_for
from tests.test_keys import FAST, assert_envelope, make_key, wait_for_usage


TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}


@pytest.fixture(scope="module")
def tool_upstream() -> Iterator[Server]:
    """An OpenAI-compatible server whose model calls tools (tests/fake_openai.py)."""
    server = start_fake("fake_openai.py", "--models", "tool-model", "--name", "Tools")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(stack: Stack, tool_upstream: Server) -> Iterator[Server]:
    server = start_gateway(stack.controller.url, "--workers", "2", "--openai-upstream",
                           f"tool-model={tool_upstream.url}/v1",
                           env={**FAST, "FLASKCHAT_KEEPALIVE_INTERVAL": "0.5"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keys(gateway: Server) -> dict[str, str]:
    return {name: make_key(gateway, name=f"responses-{name}")["secret"]
            for name in ("alice", "bob")}


@pytest.fixture(scope="module")
def client(gateway: Server, keys: dict[str, str]) -> Iterator[openai.OpenAI]:
    made = openai.OpenAI(base_url=gateway.url + "/v1", api_key=keys["alice"], max_retries=0)
    yield made
    made.close()


def last_messages(stack: Stack) -> list[dict[str, Any]]:
    """The messages of the fake worker's last generation."""
    calls = [entry for entry in stack.worker_log("fake-model")
             if entry["path"].startswith("/worker_generate")]
    messages: list[dict[str, Any]] = calls[-1]["body"]["messages"]
    return messages


def post(gateway: Server, key: str, **body: Any) -> requests.Response:
    return requests.post(gateway.url + "/v1/responses", timeout=30, json=body,
                         headers={"Authorization": f"Bearer {key}"})


def test_create_plain_and_with_instructions(client: openai.OpenAI, stack: Stack) -> None:
    stack.reset_worker("fake-model")
    response = client.responses.create(model="fake-model", input="[[reply:Paris.]]")
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.output_text == "Paris."
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    assert response.usage is not None and response.usage.input_tokens > 0
    assert response.usage.output_tokens == 1
    assert response.usage.total_tokens == response.usage.input_tokens + 1
    with_instructions = client.responses.create(
        model="fake-model", instructions="Answer in one word.", input="hi",
        max_output_tokens=50, temperature=0.3, metadata={"ticket": "42"})
    assert with_instructions.instructions == "Answer in one word."
    assert with_instructions.metadata == {"ticket": "42"}
    assert with_instructions.max_output_tokens == 50 and with_instructions.temperature == 0.3
    sent = last_messages(stack)
    assert sent[0] == {"role": "system", "content": "Answer in one word."}
    assert sent[1]["content"] == "hi"


def test_a_length_stop_is_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(model="fake-model", input="hi", max_output_tokens=2)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"


def test_streamed_events_in_order(client: openai.OpenAI) -> None:
    events: list[Any] = list(client.responses.create(
        model="fake-model", input="[[slow:0.05]][[reply:one two three]]", stream=True))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == "one two three" and len(deltas) >= 2
    numbers = [event.sequence_number for event in events]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    completed = events[-1].response
    assert completed.output_text == "one two three" and completed.usage.output_tokens == 3


def test_the_stream_helper(client: openai.OpenAI) -> None:
    with client.responses.stream(model="fake-model", input="[[reply:helped along]]") as stream:
        texts = [getattr(event, "delta") for event in stream
                 if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == "helped along" and final.output_text == "helped along"


def test_previous_response_id_chains_three_turns(client: openai.OpenAI, stack: Stack) -> None:
    # A stock-FastChat-style worker: the gateway renders the whole conversation into the
    # prompt, so the worker's count of input tokens shows the replayed history.
    first = client.responses.create(model="llama2-stock", input="[[reply:first answer]]")
    second = client.responses.create(model="llama2-stock", input="[[reply:second answer]]",
                                     previous_response_id=first.id)
    third = client.responses.create(model="llama2-stock", input="third question",
                                    previous_response_id=second.id)
    assert first.usage and second.usage and third.usage
    assert first.usage.input_tokens < second.usage.input_tokens < third.usage.input_tokens
    prompts = [entry["body"]["prompt"] for entry in stack.worker_log("llama2-stock")
               if entry["path"].startswith("/worker_generate")]
    assert "first answer" in prompts[-1] and "second answer" in prompts[-1]
    assert prompts[-1].index("first answer") < prompts[-1].index("second answer") \
        < prompts[-1].index("third question")
    assert third.previous_response_id == second.id


def test_retrieve_input_items_and_delete(client: openai.OpenAI) -> None:
    made = client.responses.create(model="fake-model", input=[
        {"role": "user", "content": "one"},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "two"}]}])
    again = client.responses.retrieve(made.id)
    assert again.id == made.id and again.output_text == made.output_text
    items: list[Any] = list(client.responses.input_items.list(made.id, order="asc"))
    assert [item.content[0].text for item in items] == ["one", "two"]
    page = client.responses.input_items.list(made.id, limit=1)
    assert len(page.data) == 1 and page.has_more
    client.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)


def test_store_false_keeps_nothing(client: openai.OpenAI) -> None:
    made = client.responses.create(model="fake-model", input="hi", store=False)
    assert made.to_dict().get("store") is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="fake-model", input="more",
                                previous_response_id=made.id)


def test_another_key_cannot_see_a_response(gateway: Server, client: openai.OpenAI,
                                           keys: dict[str, str]) -> None:
    made = client.responses.create(model="fake-model", input="mine")
    headers = {"Authorization": f"Bearer {keys['bob']}"}
    for response in (
            requests.get(f"{gateway.url}/v1/responses/{made.id}", headers=headers, timeout=10),
            requests.get(f"{gateway.url}/v1/responses/{made.id}/input_items", headers=headers,
                         timeout=10),
            requests.delete(f"{gateway.url}/v1/responses/{made.id}", headers=headers,
                            timeout=10),
            post(gateway, keys["bob"], model="fake-model", input="x",
                 previous_response_id=made.id)):
        assert_envelope(response, 404)
    assert client.responses.retrieve(made.id).id == made.id  # still there for its owner


BAD_REQUESTS = [
    ({"input": "hi"}, 400, "model"),
    ({"model": "fake-model"}, 400, "input"),
    ({"model": "fake-model", "input": []}, 400, "input"),
    ({"model": "fake-model", "input": [42]}, 400, "input[0]"),
    ({"model": "fake-model", "input": [{"type": "input_image", "image_url": "x"}]}, 400,
     "input[0].type"),
    ({"model": "fake-model", "input": [{"role": "robot", "content": "x"}]}, 400,
     "input[0].role"),
    ({"model": "fake-model", "input": [{"role": "user", "content": [{"type": "input_file"}]}]},
     400, "input[0].content[0].type"),
    ({"model": "fake-model", "input": [{"type": "function_call_output", "output": "x"}]},
     400, "input[0].call_id"),
    ({"model": "fake-model", "input": "hi", "tools": [{"type": "web_search"}]}, 400,
     "tools[0].type"),
    ({"model": "fake-model", "input": "hi", "tools": [{"type": "function"}]}, 400,
     "tools[0].name"),
    ({"model": "fake-model", "input": "hi", "tool_choice": {"type": "file_search"}}, 400,
     "tool_choice"),
    ({"model": "fake-model", "input": "hi", "tools": [{"type": "function", "name": "a b"}]},
     400, "tools[0].name"),
    ({"model": "fake-model", "input": "hi",
      "tools": [{"type": "function", "name": "f", "parameters": "{}"}]}, 400,
     "tools[0].parameters"),
    ({"model": "fake-model", "input": "hi", "tool_choice": {"type": "function", "name": "a b"}},
     400, "tool_choice.name"),
    # More messages than --max-messages (2048), as on the chat route.
    ({"model": "fake-model", "input": [{"role": "user", "content": "x"}] * 2049}, 400,
     "input"),
    ({"model": "fake-model", "input": "hi", "max_output_tokens": 10**9}, 400,
     "max_output_tokens"),
    # A FastChat worker without the capability: the chat path's error, named as sent.
    ({"model": "fake-model", "input": "hi", "text": {"format": {"type": "json_object"}}},
     400, "text.format"),
    ({"model": "fake-model", "input": "hi", "background": True}, 400, "background"),
    ({"model": "fake-model", "input": "hi", "reasoning": {"effort": "high"}}, 400,
     "reasoning"),
    ({"model": "fake-model", "input": "hi", "include": ["reasoning.encrypted_content"]}, 400,
     "include"),
    ({"model": "fake-model", "input": "hi", "truncation": "auto"}, 400, "truncation"),
    ({"model": "fake-model", "input": "hi", "conversation": "conv_123"}, 400, "conversation"),
    ({"model": "fake-model", "input": "hi", "prompt": {"id": "pmpt_1"}}, 400, "prompt"),
    ({"model": "fake-model", "input": "hi", "top_logprobs": 3}, 400, "top_logprobs"),
    ({"model": "fake-model", "input": "hi", "text": {"format": {"type": "xml"}}}, 400,
     "text.format.type"),
    ({"model": "fake-model", "input": "hi", "temperature": 5}, 400, "temperature"),
    ({"model": "fake-model", "input": "hi", "max_output_tokens": 0}, 400,
     "max_output_tokens"),
    ({"model": "fake-model", "input": "hi", "metadata": {"k": 1}}, 400, "metadata"),
    ({"model": "fake-model", "input": "hi", "previous_response_id": "resp_nope"}, 404,
     "previous_response_id"),
    ({"model": "no-such-model", "input": "hi"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD_REQUESTS)
def test_bad_input_is_a_clear_error(gateway: Server, keys: dict[str, str],
                                    body: dict[str, Any], status: int, param: str) -> None:
    assert_envelope(post(gateway, keys["alice"], **body), status, param=param)


def test_tools_for_a_worker_without_the_capability_are_refused(
        gateway: Server, keys: dict[str, str]) -> None:
    response = post(gateway, keys["alice"], model="fake-model", input="hi", tools=[
        {"type": "function", "name": "lookup", "parameters": {"type": "object"}}])
    assert_envelope(response, 400, param="tools")


def test_input_items_paging_errors(gateway: Server, client: openai.OpenAI,
                                   keys: dict[str, str]) -> None:
    made = client.responses.create(model="fake-model", input="hi")
    headers = {"Authorization": f"Bearer {keys['alice']}"}
    url = f"{gateway.url}/v1/responses/{made.id}/input_items"
    assert_envelope(requests.get(url + "?limit=0", headers=headers, timeout=10), 400,
                    param="limit")
    assert_envelope(requests.get(url + "?order=up", headers=headers, timeout=10), 400,
                    param="order")
    assert_envelope(requests.get(url + "?after=msg_none", headers=headers, timeout=10), 400,
                    param="after")
    again = f"{gateway.url}/v1/responses/{made.id}?stream=true"
    assert_envelope(requests.get(again, headers=headers, timeout=10), 400, param="stream")


def test_a_bad_responses_ttl_stops_the_server_at_start() -> None:
    from tests.test_keys import cli
    started = cli("serve", "--port", "0", "--responses-ttl", "soon")
    assert started.returncode == 2 and "--responses-ttl" in started.stderr
    assert "Traceback" not in started.stderr


def test_openapi_documents_the_endpoints(gateway: Server) -> None:
    paths = requests.get(gateway.url + "/openapi.json", timeout=10).json()["paths"]
    assert "post" in paths["/v1/responses"]
    assert {"get", "delete"} <= set(paths["/v1/responses/{response_id}"])
    assert "get" in paths["/v1/responses/{response_id}/input_items"]
    body = paths["/v1/responses"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]


# The chat request a Responses request becomes is made directly, not loaded by the chat
# schema a second time: it must be what that load would give, for every kind of request.
EQUIVALENT_REQUESTS = [
    {"model": "m", "input": "hi"},
    {"model": "m", "input": "hi", "stream": True, "instructions": "Be brief.",
     "max_output_tokens": 7, "temperature": 1, "top_p": 0.5, "user": "u1"},
    {"model": "m", "input": [{"role": "developer", "content": "rules"},
                             {"role": "user", "content": [{"type": "input_text", "text": "a"},
                                                          {"type": "input_text", "text": "b"}]},
                             {"type": "function_call", "call_id": "c1", "name": "f",
                              "arguments": "{}"},
                             {"type": "function_call", "call_id": "c2", "name": "g",
                              "arguments": "{}"},
                             {"type": "function_call_output", "call_id": "c1", "output": "x"},
                             {"type": "function_call_output", "call_id": "c2",
                              "output": {"n": 1}},
                             {"role": "assistant", "content": "done"}],
     "tools": [TOOL, {"type": "function", "name": "g", "strict": False}],
     "tool_choice": {"type": "function", "name": "g"}, "parallel_tool_calls": False},
    {"model": "m", "input": "hi", "tools": [TOOL], "tool_choice": "required",
     "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"},
                         "strict": True}}},
    {"model": "m", "input": "hi", "text": {"format": {"type": "json_object"}}},
    {"model": "m", "input": "hi", "text": {"format": {"type": "text"}}, "stream": False},
]


@pytest.mark.parametrize("request_body", EQUIVALENT_REQUESTS)
def test_the_chat_request_is_what_the_chat_schema_would_load(
        request_body: dict[str, Any]) -> None:
    from app.responses import translate
    from app.web.validation import load
    from schemas import RequestSchemas
    schemas = RequestSchemas()
    history: list[dict[str, Any]] = [{"role": "user", "content": "earlier"},
                                     {"role": "assistant", "content": None, "tool_calls": [
                                         {"id": "c0", "type": "function",
                                          "function": {"name": "f", "arguments": "{}"}}]},
                                     {"role": "tool", "tool_call_id": "c0", "content": "y"}]
    body = load(schemas.responses, request_body)
    payload, _, _ = translate.chat_request(body, history, schemas.max_messages)
    assert translate.chat_body(payload) == load(schemas.chat, payload)


def test_limits_apply_as_on_the_chat_route() -> None:
    from app.errors import InvalidRequest
    from app.responses import translate
    from app.web.validation import load
    from schemas import RequestSchemas
    schemas = RequestSchemas(max_messages=2, max_tokens_limit=100)
    with pytest.raises(InvalidRequest) as too_many:
        body = load(schemas.responses, {"model": "m", "input": "hi", "instructions": "x"})
        translate.chat_request(body, [{"role": "user", "content": "earlier"}], 2)
    assert too_many.value.param == "input"
    with pytest.raises(InvalidRequest) as too_long:
        load(schemas.responses, {"model": "m", "input": "hi", "max_output_tokens": 101})
    assert too_long.value.param == "max_output_tokens"
    for tools, param in (([{"type": "function", "name": "bad name"}], "tools[0].name"),
                         ([{"type": "function", "name": "f", "parameters": "{}"}],
                          "tools[0].parameters")):
        with pytest.raises(InvalidRequest) as bad_tool:
            body = load(schemas.responses, {"model": "m", "input": "hi", "tools": tools})
            translate.chat_request(body, [], 10)
        assert bad_tool.value.param == param


# ---- function tools, end to end against an upstream that supports them ---------------------

def test_function_tool_round_trip(client: openai.OpenAI) -> None:
    asked = client.responses.create(model="tool-model", input="Weather in Paris?",
                                    tools=[TOOL])  # type: ignore[list-item]
    call = asked.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.arguments == '{"city": "Paris"}' and call.call_id
    answered = client.responses.create(
        model="tool-model", previous_response_id=asked.id, tools=[TOOL],  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert answered.output_text == "The tool said: sunny."
    # The same without stored state: the client sends the whole conversation.
    stateless = client.responses.create(
        model="tool-model", store=False, tools=[TOOL],  # type: ignore[list-item]
        input=[{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": call.call_id, "name": "get_weather",
                "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "rainy"}])
    assert stateless.output_text == "The tool said: rainy."


def test_function_tool_round_trip_streamed(client: openai.OpenAI) -> None:
    events: list[Any] = list(client.responses.create(
        model="tool-model", input="Weather in Paris?", tools=[TOOL],  # type: ignore[list-item]
        stream=True))
    kinds = [event.type for event in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done",
                     "response.completed"]
    item = events[-2].item
    assert item.type == "function_call" and item.arguments == '{"city": "Paris"}'
    with client.responses.stream(
            model="tool-model", previous_response_id=events[-1].response.id,
            tools=[TOOL],  # type: ignore[list-item]
            input=[{"type": "function_call_output", "call_id": item.call_id,
                    "output": "windy"}]) as stream:
        final = stream.get_final_response()
    assert final.output_text == "The tool said: windy."


def test_the_openai_agents_sdk_runs_an_agent_with_a_tool(
        gateway: Server, keys: dict[str, str]) -> None:
    """The OpenAI Agents SDK, which speaks the Responses API, against flaskchat: the model
    calls the tool, the SDK runs it and sends the result back, the model answers."""
    import asyncio

    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # no export to OpenAI's servers
    seen: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"sunny in {city}"

    async def run() -> Any:
        client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=keys["alice"],
                                    max_retries=0)
        try:
            agent = Agent(name="weather", instructions="Use the tool.", tools=[get_weather],
                          model=OpenAIResponsesModel("tool-model", client))
            return await Runner.run(agent, "What is the weather in Paris?")
        finally:
            await client.close()
    result = asyncio.run(run())
    assert seen == ["Paris"]
    assert result.final_output == "The tool said: sunny in Paris."


# ---- failures, cancellation, the store's bounds ----------------------------------------------

def test_a_failure_after_the_first_byte_is_response_failed(client: openai.OpenAI) -> None:
    events: list[Any] = list(client.responses.create(
        model="fake-model", input="[[error:50001]]", stream=True))
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.failed"
    assert "response.output_text.delta" in kinds  # it failed mid-stream, after two tokens
    failed = events[-1].response
    assert failed.status == "failed" and failed.error is not None and failed.error.message


def test_a_quiet_stream_gets_keepalives_and_its_usage_is_counted(gateway: Server) -> None:
    """As for chat streams: comments while the model is silent (after response.created),
    and the key's usage records the stream's tokens."""
    made = make_key(gateway, name="responses-usage")
    with requests.post(gateway.url + "/v1/responses", stream=True, timeout=30,
                       headers={"Authorization": f"Bearer {made['secret']}"},
                       json={"model": "fake-model", "input": "[[slow:1.2]] hi",
                             "max_output_tokens": 2, "stream": True, "store": False}) as got:
        assert got.status_code == 200
        body = b"".join(got.iter_content(None))
    created = body.index(b"event: response.created")
    first_delta = body.index(b"event: response.output_text.delta")
    assert b": keepalive" in body[created:first_delta]
    assert body.rstrip().endswith(b"}") and b"event: response.incomplete" in body
    row = wait_for_usage(gateway, made["id"], 1)
    assert row["completion_tokens"] == 2 and row["prompt_tokens"] > 0, row


def test_leaving_a_stream_cancels_the_generation(
        gateway: Server, keys: dict[str, str], stack: Stack) -> None:
    stack.reset_worker("fake-model")
    words = " ".join(f"w{i}" for i in range(40))
    with requests.post(gateway.url + "/v1/responses", stream=True, timeout=30,
                       headers={"Authorization": f"Bearer {keys['alice']}"},
                       json={"model": "fake-model", "stream": True, "store": False,
                             "input": f"[[slow:0.1]][[reply:{words}]]"}) as response:
        deltas = 0
        for line in response.iter_lines():
            deltas += line == b"event: response.output_text.delta"
            if deltas >= 2:
                break
    wait_for(lambda: stack.worker_stats("fake-model")["cancelled"] >= 1, 10,
             "the worker to see the generation cancelled")


def test_the_store_expires_and_is_bounded(tmp_path: Any) -> None:
    """Against a real SQLite file: expired responses are gone, and past the cap the
    oldest are deleted first."""
    from app.access.database import engine_for, upgrade
    from app.responses.store import ResponseNotFound, ResponseStore

    url = f"sqlite:///{tmp_path}/store.db"
    upgrade(url)
    engine = engine_for(url)
    store = ResponseStore(engine, ttl_seconds=3600, max_stored=3)
    for number in range(5):
        store.save({"id": f"resp_{number}", "model": "m", "output": []}, "key_a", [], [])
        store.flush()
    store.prune()
    for number in (0, 1):
        with pytest.raises(ResponseNotFound):
            store.get(f"resp_{number}", "key_a")
    assert [store.get(f"resp_{n}", "key_a")["id"] for n in (2, 3, 4)] == \
        ["resp_2", "resp_3", "resp_4"]
    with pytest.raises(ResponseNotFound):
        store.get("resp_4", "key_b")  # another key's
    expiring = ResponseStore(engine, ttl_seconds=0.001, max_stored=10)
    expiring.save({"id": "resp_short", "model": "m", "output": []}, "key_a", [], [])
    expiring.flush()
    wait_for(lambda: _gone(expiring, "resp_short"), 5, "the response to expire")
    engine.dispose()


def _gone(store: Any, response_id: str) -> bool:
    from app.responses.store import ResponseNotFound
    try:
        store.get(response_id, "key_a")
    except ResponseNotFound:
        return True
    return False

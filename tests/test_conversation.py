"""Prompt rendering, byte for byte against FastChat's output (PROTOCOL.md section 7.4)."""
from __future__ import annotations

from typing import Any

import pytest

from app.serving.prompt import TemplateError, render, stop_strings
from schemas.messages import ChatMessage
from tests.fake_data import TEMPLATES

MESSAGES: list[ChatMessage] = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi there."},
    {"role": "user", "content": "What is 2+2?"},
]

OASST: dict[str, Any] = {"name": "oasst_pythia", "system_template": "{system_message}",
                         "system_message": "", "roles": ["<|prompter|>", "<|assistant|>"],
                         "messages": [], "offset": 0, "sep_style": 4,
                         "sep": "<|endoftext|>", "sep2": None, "stop_str": None,
                         "stop_token_ids": None}
ZERO_SHOT: dict[str, Any] = {"name": "zero_shot", "system_template": "{system_message}",
                             "system_message": "", "roles": ["Human", "Assistant"],
                             "messages": [], "offset": 0, "sep_style": 1, "sep": "\n### ",
                             "sep2": None, "stop_str": "###", "stop_token_ids": None}


@pytest.mark.parametrize("template, expected", [
    (TEMPLATES["vicuna_v1.1"],
     "Answer briefly. USER: Hello! ASSISTANT: Hi there.</s>USER: What is 2+2? ASSISTANT:"),
    (TEMPLATES["llama-2"],
     "[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nHello! [/INST] Hi there. </s><s>[INST] "
     "What is 2+2? [/INST]"),
    (TEMPLATES["llama-3"],
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer briefly."
     "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\nHi there.<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    (TEMPLATES["qwen-7b-chat"],
     "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n"
     "<|im_start|>assistant\nHi there.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
     "<|im_start|>assistant\n"),
    (OASST, "Answer briefly.<|prompter|>Hello!<|endoftext|><|assistant|>Hi there."
            "<|endoftext|><|prompter|>What is 2+2?<|endoftext|><|assistant|>"),
    (ZERO_SHOT, "Answer briefly.\n### Human: Hello!\n### Assistant: Hi there.\n### Human: "
                "What is 2+2?\n### Assistant:"),
])
def test_render_matches_fastchat(template: dict[str, Any], expected: str) -> None:
    prompt, images = render(template, MESSAGES)
    assert prompt == expected
    assert images == []


def test_default_system_message_and_no_system() -> None:
    prompt, _ = render(TEMPLATES["vicuna_v1.1"], [{"role": "user", "content": "Hi"}])
    assert prompt.startswith("A chat between a curious user")
    assert prompt.endswith(" USER: Hi ASSISTANT:")
    prompt, _ = render(TEMPLATES["llama-2"], [{"role": "user", "content": "Hello!"}])
    assert prompt == "[INST] Hello! [/INST]"


def test_last_system_message_wins_and_tool_turns_render() -> None:
    messages: list[ChatMessage] = [
        {"role": "system", "content": "first"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "content": "12 C", "tool_call_id": "c1"},
        {"role": "system", "content": "second"},
    ]
    prompt, _ = render(TEMPLATES["llama-2"], messages)
    assert prompt.startswith("[INST] <<SYS>>\nsecond\n<</SYS>>")
    assert '{"name":"get_weather","arguments":"{\\"city\\": \\"Oslo\\"}"}' in prompt
    assert "[INST] 12 C [/INST]" in prompt


def test_images_become_placeholders_where_fastchat_shows_them() -> None:
    messages: list[ChatMessage] = [{"role": "user", "content": "What is this?",
                                    "images": ["data:image/png;base64,AAAA"]}]
    prompt, images = render(TEMPLATES["vicuna_v1.1"], messages)
    assert "USER: $$<image>$$<image>\nWhat is this? ASSISTANT:" in prompt
    assert images == ["data:image/png;base64,AAAA"]


def test_template_errors() -> None:
    with pytest.raises(TemplateError):
        render({**TEMPLATES["vicuna_v1.1"], "sep_style": 99}, MESSAGES)
    with pytest.raises(TemplateError):
        render({"name": "broken"}, MESSAGES)


def test_stop_strings() -> None:
    assert stop_strings(TEMPLATES["llama-3"]) == ["<|eot_id|>"]
    assert stop_strings(TEMPLATES["vicuna_v1.1"]) == []
    assert stop_strings({"stop_str": ["a", "", "b"]}) == ["a", "b"]


def test_pypi_fastchat_numbering_is_recognised() -> None:
    """fschat 0.2.36 (PyPI) numbers CHATML 9; newer FastChat numbers it 10 and sends
    max_image_size_mb/system_message_vision along, which tells the two apart."""
    newer = TEMPLATES["qwen-7b-chat"]
    older = {k: v for k, v in newer.items()
             if k not in ("max_image_size_mb", "system_message_vision")}
    older["sep_style"] = 9
    assert render(older, MESSAGES) == render(newer, MESSAGES)
    assert render({**newer, "sep_style": "CHATML"}, MESSAGES) == render(newer, MESSAGES)


@pytest.mark.parametrize("ours, reference", [("chatml", "qwen-7b-chat"),
                                             ("llama-3", "llama-3")])
def test_worker_templates_render_like_the_styles_they_stand_in_for(ours: str,
                                                                   reference: str) -> None:
    """The worker reports ChatML and Llama 3 with styles numbered the same in every FastChat
    version; they must render what CHATML and LLAMA3 render."""
    from app.worker.templates import TEMPLATES as WORKER_TEMPLATES
    template = dict(WORKER_TEMPLATES[ours])
    assert template["sep_style"] < 8
    expected = dict(TEMPLATES[reference])
    assert render(template, MESSAGES)[0] == render(expected, MESSAGES)[0]

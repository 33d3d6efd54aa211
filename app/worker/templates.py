"""FastChat conversation templates that this worker reports at /worker_get_conv_template.

A stock FastChat API server builds prompts from them, so they must reproduce the model's own
chat template; the worker picks one from the markers in that template, or takes the one
named by --conv-template.

FastChat renumbered its SeparatorStyle enum after the 0.2.36 release on PyPI (LLAMA3 went in
at 8), so a style numbered 8 or more means different things to different FastChat versions.
These templates therefore use only styles 1-7, whose numbers every version shares: ChatML is
ADD_NEW_LINE_SINGLE with "<|im_end|>\\n" as separator, and Llama 3 is NO_COLON_SINGLE with the
header tags in the role names. Both render byte-for-byte what CHATML/LLAMA3 would.
"""
from __future__ import annotations

from typing import Any

ADD_COLON_SINGLE, ADD_COLON_TWO, NO_COLON_SINGLE, ADD_NEW_LINE_SINGLE, LLAMA2 = 1, 2, 4, 6, 7

_BASE: dict[str, Any] = {"system_template": "{system_message}", "system_message": "",
                         "messages": [], "offset": 0, "sep2": None, "stop_str": None,
                         "stop_token_ids": None}


def _header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


TEMPLATES: dict[str, dict[str, Any]] = {
    "chatml": {**_BASE, "name": "chatml",
               "system_template": "<|im_start|>system\n{system_message}",
               "roles": ["<|im_start|>user", "<|im_start|>assistant"],
               "sep_style": ADD_NEW_LINE_SINGLE, "sep": "<|im_end|>\n",
               "stop_str": "<|im_end|>"},
    "llama-3": {**_BASE, "name": "llama-3",
                "system_template": "<|begin_of_text|>" + _header("system") +
                                   "{system_message}<|eot_id|>",
                "roles": [_header("user"), _header("assistant")],
                "sep_style": NO_COLON_SINGLE, "sep": "<|eot_id|>",
                "stop_str": "<|eot_id|>", "stop_token_ids": [128001, 128009]},
    "llama-2": {**_BASE, "name": "llama-2",
                "system_template": "[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n",
                "roles": ["[INST]", "[/INST]"], "sep_style": LLAMA2, "sep": " ",
                "sep2": " </s><s>"},
    "vicuna_v1.1": {**_BASE, "name": "vicuna_v1.1",
                    "system_message": "A chat between a curious user and an artificial "
                    "intelligence assistant. The assistant gives helpful, detailed, and polite "
                    "answers to the user's questions.",
                    "roles": ["USER", "ASSISTANT"], "sep_style": ADD_COLON_TWO, "sep": " ",
                    "sep2": "</s>"},
    "zero_shot": {**_BASE, "name": "zero_shot",
                  "system_message": "A chat between a curious human and an artificial "
                  "intelligence assistant. The assistant gives helpful, detailed, and polite "
                  "answers to the human's questions.",
                  "roles": ["Human", "Assistant"], "sep_style": ADD_COLON_SINGLE,
                  "sep": "\n### ", "stop_str": "###"},
}

_MARKERS = (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama-3"),
            ("[INST]", "llama-2"))


def template_for(chat_template: str | None, name: str = "",
                 default_system: str = "") -> dict[str, Any]:
    if name:
        if name not in TEMPLATES:
            raise ValueError(f"unknown --conv-template {name!r}; known: {', '.join(TEMPLATES)}")
        return dict(TEMPLATES[name])
    chosen = next((t for marker, t in _MARKERS if chat_template and marker in chat_template),
                  "zero_shot")
    template = dict(TEMPLATES[chosen])
    if default_system:
        template["system_message"] = default_system
    return template

"""FastChat conversation templates that this worker can report at /worker_get_conv_template.

A stock FastChat API server builds prompts from them, so they must match the model's own
chat template; the worker picks one from the markers in that template, or takes the one
named by --conv-template. Field values as FastChat's registry; sep_style numbered as
FastChat's current enum (which is why max_image_size_mb is present, see
app.conversation.style_of).
"""
from __future__ import annotations

from typing import Any

_BASE: dict[str, Any] = {"system_template": "{system_message}", "system_message": "",
                         "system_message_vision": "", "messages": [], "offset": 0,
                         "sep2": None, "stop_str": None, "stop_token_ids": None,
                         "max_image_size_mb": None}

TEMPLATES: dict[str, dict[str, Any]] = {
    "chatml": {**_BASE, "name": "chatml",
               "system_template": "<|im_start|>system\n{system_message}",
               "roles": ["<|im_start|>user", "<|im_start|>assistant"], "sep_style": 10,
               "sep": "<|im_end|>", "stop_str": "<|im_end|>"},
    "llama-3": {**_BASE, "name": "llama-3",
                "system_template": "<|start_header_id|>system<|end_header_id|>\n\n"
                                   "{system_message}<|eot_id|>",
                "roles": ["user", "assistant"], "sep_style": 8, "sep": "",
                "stop_str": "<|eot_id|>", "stop_token_ids": [128001, 128009]},
    "llama-2": {**_BASE, "name": "llama-2",
                "system_template": "[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n",
                "roles": ["[INST]", "[/INST]"], "sep_style": 7, "sep": " ",
                "sep2": " </s><s>"},
    "vicuna_v1.1": {**_BASE, "name": "vicuna_v1.1",
                    "system_message": "A chat between a curious user and an artificial "
                    "intelligence assistant. The assistant gives helpful, detailed, and polite "
                    "answers to the user's questions.",
                    "roles": ["USER", "ASSISTANT"], "sep_style": 2, "sep": " ",
                    "sep2": "</s>"},
    "zero_shot": {**_BASE, "name": "zero_shot",
                  "system_message": "A chat between a curious human and an artificial "
                  "intelligence assistant. The assistant gives helpful, detailed, and polite "
                  "answers to the human's questions.",
                  "roles": ["Human", "Assistant"], "sep_style": 1, "sep": "\n### ",
                  "stop_str": "###"},
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

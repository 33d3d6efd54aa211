"""What the fake worker answers, shared with the tests that check its answers."""
from __future__ import annotations

import hashlib
from typing import Any

DEFAULT_REPLY = "Hello! I am a fake model."

TEMPLATES: dict[str, dict[str, Any]] = {
    "vicuna_v1.1": {
        "name": "vicuna_v1.1", "system_template": "{system_message}",
        "system_message": "A chat between a curious user and an artificial intelligence "
        "assistant. The assistant gives helpful, detailed, and polite answers to the user's "
        "questions.",
        "system_message_vision": "", "roles": ["USER", "ASSISTANT"], "messages": [],
        "offset": 0, "sep_style": 2, "sep": " ", "sep2": "</s>", "stop_str": None,
        "stop_token_ids": None, "max_image_size_mb": None},
    "llama-2": {
        "name": "llama-2", "system_template": "[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n",
        "system_message": "", "system_message_vision": "", "roles": ["[INST]", "[/INST]"],
        "messages": [], "offset": 0, "sep_style": 7, "sep": " ", "sep2": " </s><s>",
        "stop_str": None, "stop_token_ids": None, "max_image_size_mb": None},
    "llama-3": {
        "name": "llama-3",
        "system_template": "<|start_header_id|>system<|end_header_id|>\n\n{system_message}"
        "<|eot_id|>",
        "system_message": "", "system_message_vision": "", "roles": ["user", "assistant"],
        "messages": [], "offset": 0, "sep_style": 8, "sep": "", "sep2": None,
        "stop_str": "<|eot_id|>", "stop_token_ids": [128001, 128009],
        "max_image_size_mb": None},
    "qwen-7b-chat": {
        "name": "qwen-7b-chat", "system_template": "<|im_start|>system\n{system_message}",
        "system_message": "You are a helpful assistant.", "system_message_vision": "",
        "roles": ["<|im_start|>user", "<|im_start|>assistant"], "messages": [], "offset": 0,
        "sep_style": 10, "sep": "<|im_end|>", "sep2": None, "stop_str": "<|endoftext|>",
        "stop_token_ids": [151643, 151644, 151645], "max_image_size_mb": None},
}


def vector(text: str, dim: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    values = [(digest[i % len(digest)] - 128) / 128.0 for i in range(dim)]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]

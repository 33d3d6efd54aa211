"""Usage as OpenAI counts it, from worker frames or an upstream's answers."""
from __future__ import annotations

from typing import Any, Sequence


class UsageTally:
    """Each prompt once, every choice's completion tokens."""

    def __init__(self, choices_per_prompt: int, prompt_tokens: Sequence[int | None]) -> None:
        self._per_prompt = choices_per_prompt
        self._known_prompt_tokens = list(prompt_tokens)
        self._last: dict[int, dict[str, Any]] = {}

    def record(self, index: int, frame: dict[str, Any]) -> None:
        usage = frame.get("usage")
        if isinstance(usage, dict):
            self._last[index] = usage

    def total(self) -> dict[str, int]:
        prompt = 0
        for group, known in enumerate(self._known_prompt_tokens):
            counted = [_count(self._last.get(group * self._per_prompt + i), "prompt_tokens")
                       for i in range(self._per_prompt)]
            prompt += max(counted + [known or 0])
        completion = sum(_count(u, "completion_tokens") for u in self._last.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


def completion_tokens(payload: dict[str, Any]) -> int:
    """``usage.completion_tokens`` of a worker frame or an OpenAI answer or chunk (0 if
    absent)."""
    usage = payload.get("usage")
    return _count(usage if isinstance(usage, dict) else None, "completion_tokens")


def prompt_tokens(payload: dict[str, Any]) -> int:
    usage = payload.get("usage")
    return _count(usage if isinstance(usage, dict) else None, "prompt_tokens")


def _count(usage: dict[str, Any] | None, key: str) -> int:
    if not usage:
        return 0
    value = usage.get(key)
    return value if isinstance(value, int) and value >= 0 else 0

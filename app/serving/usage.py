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


CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English text


def answer_tokens(answer: dict[str, Any]) -> int:
    """A non-stream answer's completion tokens estimated from its text (a token per four
    characters, rounded up per answer), for an upstream that gives no usage."""
    chars = 0
    for choice in answer.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if isinstance(message, dict):
            content = message.get("content")
            chars += len(content) if isinstance(content, str) else 0
            for call in message.get("tool_calls") or ():
                function = call.get("function") if isinstance(call, dict) else None
                arguments = function.get("arguments") if isinstance(function, dict) else None
                chars += len(arguments) if isinstance(arguments, str) else 0
        text = choice.get("text")
        chars += len(text) if isinstance(text, str) else 0
    return -(-chars // CHARS_PER_TOKEN)


def _count(usage: dict[str, Any] | None, key: str) -> int:
    if not usage:
        return 0
    value = usage.get(key)
    return value if isinstance(value, int) and 0 <= value < MAX_TOKENS else 0


# A count past this is not one a model made (a broken or hostile upstream): it is ignored,
# and the tokens seen passing are charged instead. (2^31: what a usage column holds.)
MAX_TOKENS = 2**31

"""A reply's text as its tokens arrive, decoding a short window per token instead of the
whole reply every time (which costs O(n) per token, O(n^2) per reply).

The window is the tokens since the last text released plus the few before them: decoding
``window`` and ``window minus its new tokens`` and taking the difference gives the new
text, with the leading space a tokenizer adds or drops between tokens right. Text that
ends in an incomplete UTF-8 sequence (U+FFFD) waits for the token that completes it.
"""
from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalText:
    def __init__(self, tokenizer: Any) -> None:
        self._decode = tokenizer.decode
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # the window's first token (context for the released text)
        self._read = 0  # tokens before this one are released as text

    def add(self, token: int) -> str:
        """Appends a token and returns the whole text so far."""
        self.ids.append(token)
        known = self._decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        window = self._decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(window) > len(known) and not window.endswith(REPLACEMENT):
            self.text += window[len(known):]
            self._prefix, self._read = self._read, len(self.ids)
        return self.text

    def finish(self) -> str:
        """The whole text, including a trailing incomplete character (as U+FFFD)."""
        if self._read < len(self.ids):
            known = self._decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
            window = self._decode(self.ids[self._prefix:], skip_special_tokens=True)
            self.text += window[len(known):]
            self._prefix = self._read = len(self.ids)
        return self.text

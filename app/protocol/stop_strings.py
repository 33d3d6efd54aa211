"""From a worker's cumulative text to the deltas a client may see. Pure.

Stop strings are enforced here as well as by the worker, because not every worker honours
them: text is released only once it cannot be the start of a stop string, so a client
never sees part of one, even when it arrives split across frames.
"""
from __future__ import annotations

from typing import Any, Sequence

INCOMPLETE_CHARACTER = "\ufffd"  # what a worker decodes from half a multibyte character
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter")


class TextTracker:
    def __init__(self, stops: Sequence[str] = (), floor: int = 0) -> None:
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.floor = floor  # stop strings are looked for from here on (after an echo)
        self.sent = 0  # characters of the cumulative text released so far
        self.stopped = False  # a stop string was found; nothing more will be released
        self._latest = ""

    def feed(self, cumulative: str, final: bool = False) -> str:
        """The newly releasable text; sets ``stopped`` when a stop string ends the reply."""
        if self.stopped:
            return ""
        text = cumulative.rstrip(INCOMPLETE_CHARACTER)
        self._latest = text
        if len(text) <= self.sent:
            return ""
        start = max(self.sent, self.floor)
        if self.stops:
            cut = _first_stop(text, self.stops, start)
            # Text from here on might still become (the start of) a stop string.
            pending = len(text) if final else \
                len(text) - _held_suffix(text, start, self.stops, self.longest)
            if cut is not None and cut <= pending:
                delta = text[self.sent:cut] if cut > self.sent else ""
                self.sent = max(self.sent, cut)
                self.stopped = True
                return delta
            # A stop string that starts earlier than a complete one may still complete.
            delta = text[self.sent:pending] if pending > self.sent else ""
            self.sent = max(self.sent, pending)
            return delta
        delta = text[self.sent:]
        self.sent = len(text)
        return delta

    def flush(self) -> str:
        """Releases what was held back, at the end of a stream that gave no finish frame."""
        return self.feed(self._latest, final=True)


def cut_at_stop(text: str, stops: Sequence[str], floor: int = 0) -> tuple[str, bool]:
    """The whole text cut before the first stop string, and whether one was found."""
    cut = _first_stop(text, [s for s in stops if s], floor)
    return (text, False) if cut is None else (text[:cut], True)


def finish_reason(frame: dict[str, Any]) -> str | None:
    """The frame's finish_reason as OpenAI spells it (vLLM may send a list or "abort")."""
    reason = frame.get("finish_reason")
    if isinstance(reason, list):
        reason = next((r for r in reason if r), None)
    if reason is None:
        return None
    return reason if reason in FINISH_REASONS else "stop"


def _first_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    best: int | None = None
    for stop in stops:
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best):
            best = index
    return best


def _held_suffix(text: str, start: int, stops: Sequence[str], longest: int) -> int:
    """Length of the longest tail of ``text`` (from ``start``) that begins a stop string."""
    for i in range(max(start, len(text) - longest + 1), len(text)):
        tail = text[i:]
        if any(stop.startswith(tail) for stop in stops):
            return len(text) - i
    return 0


def final_text(frame: dict[str, Any], stops: Sequence[str], floor: int = 0) -> tuple[str, str]:
    """A final frame's text, cut at the first stop string even if the worker ignored it,
    and its finish reason."""
    text, stopped = cut_at_stop(str(frame.get("text") or "").rstrip(INCOMPLETE_CHARACTER),
                                stops, floor)
    return text, "stop" if stopped else finish_reason(frame) or "stop"

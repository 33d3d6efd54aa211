"""Grammars compiled for the model's tokenizer (llguidance), and the per-request constraint
that masks each step's scores to the tokens the grammar allows.

llguidance was chosen over xgrammar and outlines-core by measurement (bench/RESULTS.md,
issue 25): on SmolLM2's 49,152-token vocabulary its mask costs tens of microseconds a
token with no compile step to speak of, and it names the schema keywords it cannot
enforce instead of ignoring them.

A grammar is checked and compiled once (a request waits for no slot to learn it is
invalid) and kept, by a hash of its text, in a small LRU; each request then runs a copy
of the compiled matcher, which is cheap. The copies share the grammar's lexer: a grammar
that fails while generating (its lexer outgrew its limits) is dropped from the cache.

One request must not slow the batch it shares: the schemas' size is bounded before they
get here (``schemas.tools``), the lexer by LIMITS, and a row whose masks keep taking more
than MASK_BUDGET fails alone with a clear error.
"""
from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

import llguidance
import llguidance.hf
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from app.errors import InvalidRequest
from app.protocol.error_codes import INTERNAL_ERROR, PARAM_OUT_OF_RANGE
from app.worker.structured.grammars import Grammar

CACHED_GRAMMARS = 64
# llguidance documents 1-2 kB per lexer state: 20,000 keeps one grammar's lexer under
# ~40 MB (its default, 250,000, allows ~500 MB), far above what a sane schema needs.
LIMITS = llguidance.LLParserLimits(max_lexer_states=20_000, verbose_errors=False)
MASK_BUDGET = 0.02  # seconds: a hundred times a usual mask on SmolLM2's vocabulary
SLOW_MASKS = 3  # masks over the budget before the row fails
_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[(.*?)\]")


class GrammarFailed(RuntimeError):
    """A row's grammar cannot go on (too slow, or its lexer outgrew its limits): that row
    fails, with this code in its error frame; the batch goes on."""

    def __init__(self, message: str, code: int = INTERNAL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class Constraint:
    """One reply's grammar state: which tokens may come next, and whether it is over."""

    def __init__(self, matcher: Any, vocabulary: int, eos: int,
                 on_error: Callable[[], None]) -> None:
        self._matcher = matcher
        self._bitmask = allocate_token_bitmask(1, vocabulary)
        self._ready = False  # the bitmask holds the next step's allowed tokens
        self._slow = 0
        self._on_error = on_error
        self.failure: GrammarFailed | None = None
        self.eos = eos

    def prepare(self) -> None:
        """Works out which tokens may come next. Safe in another thread while the model
        computes the step's scores (it only reads the tokens taken so far, and llguidance
        lets go of the GIL): the onnx engine does it then, so it costs no time. Never
        raises: a failure is kept for ``masked``, so that only this row fails."""
        if self._ready or self.failure is not None:
            return
        started = time.perf_counter()
        try:
            fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        except Exception as exc:  # noqa: BLE001 - whatever it is, it is this row's
            self.failure = GrammarFailed(f"The grammar failed: {exc}")
            return
        self._ready = True
        if time.perf_counter() - started > MASK_BUDGET:
            self._slow += 1
            if self._slow >= SLOW_MASKS:
                self.failure = GrammarFailed(
                    "The requested format is too slow to enforce (each step took more than "
                    f"{MASK_BUDGET * 1000:.0f} ms): use a smaller schema, regex or list of "
                    "choices.", PARAM_OUT_OF_RANGE)

    def masked(self, scores: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """A copy of the scores with the tokens the grammar forbids at -inf. (numpy's
        unpackbits and where: half the time of llguidance's own apply, bench/RESULTS.md)"""
        self.prepare()
        if self.failure is not None:
            raise self.failure
        allowed = np.unpackbits(self._bitmask.view(np.uint8), count=len(scores),
                                bitorder="little").view(bool)
        result: np.ndarray[Any, Any] = np.where(allowed, scores, -np.inf)
        return result

    def advance(self, token: int) -> bool:
        """Takes the chosen token; True when the grammar allows nothing more."""
        self._ready = False
        self._matcher.consume_token(token)
        if self._matcher.is_error():  # its lexer outgrew LIMITS: never a silent "stop"
            self._on_error()
            raise GrammarFailed("The requested format could not be enforced: "
                                f"{_clean(self._matcher.get_error())}")
        return bool(self._matcher.is_stopped())


class Grammars:
    def __init__(self, tokenizer: Any, vocabulary: int, eos: int) -> None:
        self.vocabulary = vocabulary
        self.eos = eos
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocabulary,
                                                       eos_token=eos)
        self._compiled: OrderedDict[bytes, Any] = OrderedDict()
        self._lock = threading.Lock()

    def constraint(self, grammar: Grammar) -> Constraint:
        """A fresh state of the grammar (compiled once, then copied), its first mask
        worked out here, in the request's thread, not in the batch."""
        key = hashlib.sha256(grammar.text.encode()).digest()
        constraint = Constraint(self._compiled_for(grammar, key).deep_copy(), self.vocabulary,
                                self.eos, lambda: self._forget(key))
        constraint.prepare()
        return constraint

    def _compiled_for(self, grammar: Grammar, key: bytes) -> Any:
        """The compiled matcher (kept); an InvalidRequest naming the field if the grammar
        cannot be enforced."""
        with self._lock:
            matcher = self._compiled.get(key)
            if matcher is not None:
                self._compiled.move_to_end(key)
                return matcher
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar.text, self._tokenizer, limits=LIMITS)
        if failed:
            raise InvalidRequest(_explain(grammar.param, messages), grammar.param)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar.text, log_level=0,
                                       limits=LIMITS)
        if matcher.is_error():
            raise InvalidRequest(_explain(grammar.param, [matcher.get_error()]), grammar.param)
        # The first mask of a grammar builds its lexer's tables (~1.5 ms on SmolLM2's
        # vocabulary), which its copies share: built here, not in the batch.
        fill_next_token_bitmask(matcher, allocate_token_bitmask(1, self.vocabulary), 0)
        with self._lock:
            self._compiled[key] = matcher
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return matcher

    def _forget(self, key: bytes) -> None:
        with self._lock:
            self._compiled.pop(key, None)


def _explain(param: str, messages: list[str]) -> str:
    detail = _clean("; ".join(messages)) or "it cannot be compiled"
    unimplemented = _UNIMPLEMENTED.search(detail)
    if unimplemented is not None:
        keywords = unimplemented.group(1).replace('"', "'")
        return f"The JSON schema in '{param}' uses {keywords}, which this server cannot " \
            "enforce while generating: leave it out (and check it in your code), or send " \
            "the request without the schema."
    return f"'{param}' cannot be enforced while generating: {detail}"


def _clean(message: str) -> str:
    """llguidance's message for a client: one line, no Rust panic text, not too long."""
    message = message.replace("panic: ", "").strip()
    return " ".join(message.split())[:500]

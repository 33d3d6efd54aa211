"""Grammars compiled for the model's tokenizer (llguidance), and the per-request constraint
that masks each step's scores to the tokens the grammar allows.

llguidance was chosen over xgrammar and outlines-core by measurement (bench/RESULTS.md,
issue 25): on SmolLM2's 49,152-token vocabulary its mask costs tens of microseconds a
token with no compile step to speak of, and it names the schema keywords it cannot
enforce instead of ignoring them.

A grammar is checked and compiled once (a request waits for no slot to learn it is
invalid) and kept, by its text, in a small LRU; each request then runs a copy of the
compiled matcher, which is cheap.
"""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from app.errors import InvalidRequest
from app.worker.structured.grammars import Grammar

CACHED_GRAMMARS = 256
_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[(.*?)\]")


class Constraint:
    """One reply's grammar state: which tokens may come next, and whether it is over."""

    def __init__(self, matcher: Any, vocabulary: int, eos: int) -> None:
        self._matcher = matcher
        self._bitmask = allocate_token_bitmask(1, vocabulary)
        self._ready = False  # the bitmask holds the next step's allowed tokens
        self.eos = eos

    def prepare(self) -> None:
        """Works out which tokens may come next. Safe in another thread while the model
        computes the step's scores (it only reads the tokens taken so far, and llguidance
        lets go of the GIL): the onnx engine does it then, so it costs no time."""
        if not self._ready:
            fill_next_token_bitmask(self._matcher, self._bitmask, 0)
            self._ready = True

    def masked(self, scores: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """A copy of the scores with the tokens the grammar forbids at -inf. (numpy's
        unpackbits and where: half the time of llguidance's own apply, bench/RESULTS.md)"""
        self.prepare()
        allowed = np.unpackbits(self._bitmask.view(np.uint8), count=len(scores),
                                bitorder="little").view(bool)
        result: np.ndarray[Any, Any] = np.where(allowed, scores, -np.inf)
        return result

    def advance(self, token: int) -> bool:
        """Takes the chosen token; True when the grammar allows nothing more."""
        self._ready = False
        self._matcher.consume_token(token)
        return bool(self._matcher.is_stopped())


class Grammars:
    def __init__(self, tokenizer: Any, vocabulary: int, eos: int) -> None:
        self.vocabulary = vocabulary
        self.eos = eos
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocabulary,
                                                       eos_token=eos)
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, grammar: Grammar) -> Any:
        """The compiled matcher (kept); an InvalidRequest naming the field if the grammar
        cannot be enforced."""
        with self._lock:
            matcher = self._compiled.get(grammar.text)
            if matcher is not None:
                self._compiled.move_to_end(grammar.text)
                return matcher
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar.text, self._tokenizer)
        if failed:
            raise InvalidRequest(_explain(grammar.param, messages), grammar.param)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar.text)
        if matcher.is_error():
            raise InvalidRequest(_explain(grammar.param, [matcher.get_error()]), grammar.param)
        # The first mask of a grammar builds its lexer's tables (~1.5 ms on SmolLM2's
        # vocabulary), which its copies share: built here, not in the batch.
        fill_next_token_bitmask(matcher, allocate_token_bitmask(1, self.vocabulary), 0)
        with self._lock:
            self._compiled[grammar.text] = matcher
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return matcher

    def constraint(self, compiled: Any) -> Constraint:
        return Constraint(compiled.deep_copy(), self.vocabulary, self.eos)


def _explain(param: str, messages: list[str]) -> str:
    detail = "; ".join(messages) or "it cannot be compiled"
    unimplemented = _UNIMPLEMENTED.search(detail)
    if unimplemented is not None:
        keywords = unimplemented.group(1).replace('"', "'")
        return f"The JSON schema in '{param}' uses {keywords}, which this server cannot " \
            "enforce while generating: leave it out (and check it in your code), or send " \
            "the request without the schema."
    return f"'{param}' cannot be enforced while generating: {detail[:500]}"

"""Which grammar library for structured outputs (JSON schema, regex, choice) in the worker:
llguidance, xgrammar or outlines-core, on SmolLM2's 49,152-token HF tokenizer, CPU only.

    pip install llguidance xgrammar outlines-core jsonschema
    HF_HUB_OFFLINE=1 python bench/grammar_engines.py [--repeat 4]

For each library (a library that is not installed is skipped):

1. one-off tokenizer/vocabulary setup;
2. compile time: a 10-property JSON schema (first and second compile of the same schema:
   does the library cache?), `{"type": "object"}`, the regex `\\d{3}-\\d{4}`, a choice of 3
   strings; plus the cost of a fresh matcher from the compiled grammar (the per-request
   cost once we cache per schema) and of the first mask;
3. per-token cost on one row: walk a fresh matcher through the tokens of a valid instance
   of the 10-property schema; each step fills the 49,152-bit mask (and checks the token is
   allowed), then consumes the token (mean, p50, p99 in microseconds; the first walk, which
   pays the grammar's lazy work, apart from the warm ones); applying a mask to a float32
   logits row is timed apart, on the masks of that walk, for three kernels (ours in numpy,
   llguidance's numpy one, xgrammar's C++ one on torch tensors);
4. the same walk for 8 rows at once, fill + apply (numpy) + consume per step: a Python
   loop over the rows, and the library's batch helper when it has one (llguidance
   `fill_next_token_bitmask_par` + `consume_token_par`, xgrammar `BatchGrammarMatcher`);
5. JSON-schema keywords (patternProperties, uniqueItems, ...): does the library refuse the
   schema (does the message name the keyword), enforce the keyword (a valid instance
   passes, an instance that breaks only that keyword is refused) or ignore it silently;
6. "text, or exactly one tool call" (`start: TEXT | "<tool_call>" json "</tool_call>"`
   with the json constrained by a schema): compiles, masks, accepts both branches, refuses
   a call that breaks the schema;

and how each treats EOS after a complete JSON value, and how much of a walk runs without
the GIL (2 threads walking their own matchers vs 1 thread doing both: ~2x = GIL released).
Not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 49152
WORDS = (VOCAB + 31) // 32
THREADS = os.cpu_count() or 1
BATCH = 8

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "height_m": {"type": "number"},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string"},
            },
            "required": ["street", "city"],
            "additionalProperties": False,
        },
        "bio": {"type": "string", "maxLength": 80},
        "email": {"type": "string"},
        "nickname": {"type": "string"},
    },
    "required": ["name", "age", "height_m", "active", "role", "tags", "address", "bio"],
    "additionalProperties": False,
}
INSTANCE: dict[str, Any] = {
    "name": "Ada Lovelace",
    "age": 36,
    "height_m": 1.65,
    "active": True,
    "role": "admin",
    "tags": ["math", "engines", "poetry"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"},
    "bio": "First to publish an algorithm intended for a machine.",
    "email": "ada@example.org",
    "nickname": "Enchantress of Numbers",
}
ANY_OBJECT: dict[str, Any] = {"type": "object"}
REGEX = r"\d{3}-\d{4}"
CHOICES = ["positive", "negative", "neutral"]

# keyword -> (schema, valid instance, instance that breaks only that keyword, words the
# error message should contain to "name" the keyword)
KEYWORDS: list[tuple[str, dict[str, Any], Any, Any, list[str]]] = [
    ("patternProperties",
     {"type": "object", "patternProperties": {"^x_": {"type": "integer"}},
      "additionalProperties": False},
     {"x_a": 1}, {"x_a": "s"}, ["patternProperties"]),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
     [1, 2], [1, 1], ["uniqueItems"]),
    ("if/then/else",
     {"type": "object",
      "properties": {"kind": {"enum": ["a", "b"]}, "n": {"type": "integer"}},
      "required": ["kind", "n"],
      "if": {"properties": {"kind": {"const": "a"}}},
      "then": {"properties": {"n": {"minimum": 10}}},
      "else": {"properties": {"n": {"maximum": 0}}}},
     {"kind": "a", "n": 12}, {"kind": "a", "n": 5}, ["if", "then", "else"]),
    ("contains", {"type": "array", "items": {"type": "integer"}, "contains": {"const": 7}},
     [1, 7], [1, 2], ["contains"]),
    ("format: email", {"type": "string", "format": "email"},
     "ada@example.org", "not an email", ["format", "email"]),
    ("format: date-time", {"type": "string", "format": "date-time"},
     "2024-01-02T03:04:05Z", "yesterday", ["format", "date-time"]),
    ("minProperties", {"type": "object", "additionalProperties": {"type": "integer"},
                       "minProperties": 2},
     {"a": 1, "b": 2}, {"a": 1}, ["minProperties"]),
    ("$ref to $defs",
     {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}},
                       "required": ["x"], "additionalProperties": False}},
      "type": "object", "properties": {"p": {"$ref": "#/$defs/pt"}}, "required": ["p"],
      "additionalProperties": False},
     {"p": {"x": 1}}, {"p": {"x": "a"}}, ["$ref", "$defs"]),
    ("anyOf", {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]},
     "abc", True, ["anyOf"]),
    ("pattern", {"type": "string", "pattern": "^[a-z]+[0-9]$"},
     "abc1", "ABC", ["pattern"]),
    ("pattern, unanchored (JSON Schema: search)", {"type": "string", "pattern": "[0-9]{2}"},
     "ab12cd", "abcd", ["pattern"]),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, 15, 7, ["multipleOf"]),
    ("not", {"type": "integer", "not": {"const": 3}}, 4, 3, ["not"]),
    # the constraints of the 10-property schema itself
    ("minimum/maximum", {"type": "integer", "minimum": 0, "maximum": 150},
     42, 151, ["minimum", "maximum"]),
    ("maxLength", {"type": "string", "maxLength": 5}, "abc", "abcdefg", ["maxLength"]),
    ("maxItems", {"type": "array", "items": {"type": "string"}, "maxItems": 2},
     ["a"], ["a", "b", "c"], ["maxItems"]),
    ("additionalProperties: false",
     {"type": "object", "properties": {"a": {"type": "integer"}},
      "additionalProperties": False},
     {"a": 1}, {"a": 1, "b": 2}, ["additionalProperties"]),
]

TOOL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"const": "get_weather"},
        "arguments": {
            "type": "object",
            "properties": {"city": {"type": "string"},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
TOOL_LARK = ('start: TEXT | "<tool_call>" call "</tool_call>"\n'
             'TEXT: /[^<][\\s\\S]*/\n'
             'call: %json ' + json.dumps(TOOL_SCHEMA) + '\n')
TEXT_OK = "It is sunny in Paris today, 24 degrees."
CALL_OK = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", '
           '"unit": "celsius"}}</tool_call>')
CALL_BAD = '<tool_call>{"name": "get_weather", "arguments": {"town": "Paris"}}</tool_call>'


class CompileError(Exception):
    pass


def us(ns: float) -> float:
    return ns / 1000.0


def summary(samples_ns: list[int]) -> tuple[float, float, float]:
    """Mean, p50 and p99 in microseconds."""
    if not samples_ns:
        return (float("nan"),) * 3
    ordered = sorted(samples_ns)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return us(statistics.fmean(ordered)), us(statistics.median(ordered)), us(p99)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """The result and the milliseconds it took."""
    start = time.perf_counter_ns()
    result = fn()
    return result, (time.perf_counter_ns() - start) / 1e6


def bit(mask_row: np.ndarray, token: int) -> bool:
    return bool((int(mask_row[token // 32]) >> (token % 32)) & 1)


def allowed_count(mask_row: np.ndarray) -> int:
    return int(np.unpackbits(mask_row.view(np.uint8), bitorder="little")[:VOCAB].sum())


# ----------------------------------------------------------------------------- apply kernels

def apply_numpy(logits: np.ndarray, bitmask: np.ndarray) -> None:
    """Set the logits of the tokens whose bit is 0 to -inf (numpy only, any batch size)."""
    bits = np.unpackbits(bitmask.view(np.uint8), axis=-1, count=logits.shape[-1],
                         bitorder="little").view(bool)
    np.copyto(logits, -np.inf, where=~bits)


def apply_llguidance_numpy(logits: np.ndarray, bitmask: np.ndarray) -> None:
    import llguidance.numpy
    llguidance.numpy.apply_token_bitmask_inplace(logits, bitmask)


def apply_xgrammar_cpu(logits: np.ndarray, bitmask: np.ndarray) -> None:
    import torch
    import xgrammar
    xgrammar.apply_token_bitmask_inplace(torch.from_numpy(logits), torch.from_numpy(bitmask))


# ---------------------------------------------------------------------------------- adapters

class Engine:
    """One library behind the calls the benchmark needs."""

    name = ""
    package = ""
    cache_note = ""
    eos_note = ""

    def setup(self, tok: Any, eos: int) -> None:
        raise NotImplementedError

    def compile_json(self, schema: dict[str, Any]) -> Any:
        raise NotImplementedError

    def compile_regex(self, regex: str) -> Any:
        raise NotImplementedError

    def compile_choice(self, options: list[str]) -> Any:
        raise NotImplementedError

    def compile_tool(self) -> tuple[str, Any]:
        """How the "text, or exactly one tool call" grammar is written, and the grammar."""
        raise NotImplementedError

    def matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill(self, matcher: Any, bitmask: np.ndarray, row: int) -> None:
        raise NotImplementedError

    def consume(self, matcher: Any, token: int) -> bool:
        raise NotImplementedError

    def accepting(self, matcher: Any) -> bool:
        raise NotImplementedError

    def stopped(self, matcher: Any) -> bool:
        raise NotImplementedError

    fill_batch: Optional[Callable[[list[Any], np.ndarray], None]] = None
    consume_batch: Optional[Callable[[list[Any], list[int]], list[bool]]] = None

    def warnings(self, compiled: Any) -> list[str]:
        return []


class Llguidance(Engine):
    name = package = "llguidance"
    cache_note = ("no compile cache: LLMatcher() rebuilds; cache a fresh matcher per schema "
                  "and deep_copy() it")

    def setup(self, tok: Any, eos: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.numpy
        self.llg = llguidance
        self.lnp = llguidance.numpy
        self.tokenizer = llguidance.hf.from_tokenizer(tok, n_vocab=VOCAB, eos_token=eos)
        self.executor = llguidance.LLExecutor(num_threads=THREADS)
        self.fill_batch = self._fill_batch
        self.consume_batch = self._consume_batch

    def _matcher_from(self, grammar: str) -> Any:
        matcher = self.llg.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise CompileError(matcher.get_error())
        return matcher

    def compile_json(self, schema: dict[str, Any]) -> Any:
        return self._matcher_from(self.llg.LLMatcher.grammar_from_json_schema(schema))

    def compile_regex(self, regex: str) -> Any:
        return self._matcher_from(self.llg.LLMatcher.grammar_from_regex(regex))

    def compile_choice(self, options: list[str]) -> Any:
        return self._matcher_from(self.llg.grammar_from("choice", json.dumps(options)))

    def compile_tool(self) -> tuple[str, Any]:
        return "Lark + %json", self._matcher_from(self.llg.LLMatcher.grammar_from_lark(TOOL_LARK))

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, matcher: Any, bitmask: np.ndarray, row: int) -> None:
        self.lnp.fill_next_token_bitmask(matcher, bitmask, row)

    def _fill_batch(self, matchers: list[Any], bitmask: np.ndarray) -> None:
        self.lnp.fill_next_token_bitmask_par(
            self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def _consume_batch(self, matchers: list[Any], tokens: list[int]) -> list[bool]:
        return self.lnp.consume_token_par(self.executor, list(zip(matchers, tokens)))

    def consume(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))

    def accepting(self, matcher: Any) -> bool:
        return bool(matcher.is_accepting())

    def stopped(self, matcher: Any) -> bool:
        return bool(matcher.is_stopped())

    def warnings(self, compiled: Any) -> list[str]:
        return list(compiled.get_grammar_warnings())


class Xgrammar(Engine):
    name = package = "xgrammar"
    cache_note = "GrammarCompiler caches compiled grammars (cache_enabled=True)"

    def setup(self, tok: Any, eos: int) -> None:
        import xgrammar
        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=VOCAB,
                                                       stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=THREADS)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=THREADS)
        self.fill_batch = self._fill_batch
        self.consume_batch = self._consume_batch

    def compile_json(self, schema: dict[str, Any]) -> Any:
        try:
            return self.compiler.compile_json_schema(json.dumps(schema))
        except Exception as error:  # RuntimeError / InvalidJSONError from the C++ side
            raise CompileError(str(error)) from error

    def compile_regex(self, regex: str) -> Any:
        return self.compiler.compile_regex(regex)

    def compile_choice(self, options: list[str]) -> Any:
        return self.compiler.compile_grammar(
            "root ::= " + " | ".join(json.dumps(option) for option in options))

    def compile_tool(self) -> tuple[str, Any]:
        return "Lark + %json", self.compiler.compile_lark(TOOL_LARK)

    def compile_tool_tag(self) -> tuple[str, Any]:
        tag = {"type": "structural_tag", "format": {"type": "or", "elements": [
            {"type": "regex", "pattern": "[^<][\\s\\S]*"},
            {"type": "tag", "begin": "<tool_call>",
             "content": {"type": "json_schema", "json_schema": TOOL_SCHEMA},
             "end": "</tool_call>"},
        ]}}
        return "structural tag: or(regex, tag(json_schema))", \
            self.compiler.compile_structural_tag(tag)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: np.ndarray, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def _fill_batch(self, matchers: list[Any], bitmask: np.ndarray) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def _consume_batch(self, matchers: list[Any], tokens: list[int]) -> list[bool]:
        return list(self.xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens))

    def consume(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))

    def accepting(self, matcher: Any) -> bool:
        return bool(matcher.is_completed())

    def stopped(self, matcher: Any) -> bool:
        return bool(matcher.is_terminated())


def byte_level_vocabulary(tok: Any, eos: int) -> dict[bytes, list[int]]:
    """Token bytes -> ids for a GPT-2 style byte-level BPE (what outlines-core wants)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    to_byte = {chr(code): byte for byte, code in zip(printable, codes)}
    special = set(tok.all_special_ids)
    vocabulary: dict[bytes, list[int]] = {}
    for token, token_id in tok.get_vocab().items():
        if token_id == eos or token_id in special or token_id >= VOCAB:
            continue
        data = bytes(to_byte[c] for c in token) if all(c in to_byte for c in token) \
            else token.encode()
        vocabulary.setdefault(data, []).append(token_id)
    return vocabulary


def regex_escape(text: str) -> str:
    return re.sub(r"([\\.+*?()|\[\]{}^$#&\-~])", r"\\\1", text)


class OutlinesCore(Engine):
    name = "outlines-core"
    package = "outlines_core"
    cache_note = "no cache: Index() rebuilds; cache the Index per schema, Guide(index) per request"

    def setup(self, tok: Any, eos: int) -> None:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema
        self.oc = outlines_core
        self.build_regex = build_regex_from_schema
        self.vocabulary = outlines_core.Vocabulary(eos, byte_level_vocabulary(tok, eos))

    def _index(self, regex: str) -> Any:
        try:
            return self.oc.Index(regex, self.vocabulary)
        except Exception as error:
            raise CompileError(str(error)) from error

    def json_regex(self, schema: dict[str, Any]) -> str:
        try:
            return str(self.build_regex(json.dumps(schema)))
        except Exception as error:
            raise CompileError(str(error)) from error

    def compile_json(self, schema: dict[str, Any]) -> Any:
        return self._index(self.json_regex(schema))

    def compile_regex(self, regex: str) -> Any:
        return self._index(regex)

    def compile_choice(self, options: list[str]) -> Any:
        return self._index("(" + "|".join(regex_escape(option) for option in options) + ")")

    def compile_tool(self) -> tuple[str, Any]:
        regex = ("([^<][\\s\\S]*|<tool_call>(" + self.json_regex(TOOL_SCHEMA)
                 + ")</tool_call>)")
        return "one regex (schema -> regex)", self._index(regex)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, matcher: Any, bitmask: np.ndarray, row: int) -> None:
        target = bitmask[row]
        matcher.write_mask_into(target.ctypes.data, target.size, target.itemsize)

    def consume(self, matcher: Any, token: int) -> bool:
        try:
            matcher.advance(token, return_tokens=False)
        except ValueError:
            return False
        return True

    def accepting(self, matcher: Any) -> bool:
        return bool(matcher.is_finished())

    def stopped(self, matcher: Any) -> bool:
        return bool(matcher.is_finished())


# ------------------------------------------------------------------------------- measurements

def new_bitmask(rows: int) -> np.ndarray:
    return np.full((rows, WORDS), -1, dtype=np.int32)


def walk(engine: Engine, matcher: Any, tokens: list[int],
         keep_masks: Optional[list[np.ndarray]] = None) -> dict[str, Any]:
    """Fill, check the token is allowed, consume; time fill and consume per step."""
    bitmask = new_bitmask(1)
    fills: list[int] = []
    consumes: list[int] = []
    refused = 0
    for token in tokens:
        start = time.perf_counter_ns()
        engine.fill(matcher, bitmask, 0)
        middle = time.perf_counter_ns()
        if keep_masks is not None:
            keep_masks.append(bitmask.copy())
        if not bit(bitmask[0], token):
            refused += 1
        middle2 = time.perf_counter_ns()
        ok = engine.consume(matcher, token)
        end = time.perf_counter_ns()
        fills.append(middle - start)
        consumes.append(end - middle2)
        if not ok:
            refused += 1
            break
    return {"fill": fills, "consume": consumes, "refused": refused}


def walk_batch(engine: Engine, matchers: list[Any], tokens: list[int], logits: np.ndarray,
               use_batch: bool) -> dict[str, list[int]]:
    bitmask = new_bitmask(len(matchers))
    fills: list[int] = []
    applies: list[int] = []
    consumes: list[int] = []
    for token in tokens:
        rows = logits.copy()
        start = time.perf_counter_ns()
        if use_batch and engine.fill_batch is not None:
            engine.fill_batch(matchers, bitmask)
        else:
            for row, matcher in enumerate(matchers):
                engine.fill(matcher, bitmask, row)
        filled = time.perf_counter_ns()
        apply_numpy(rows, bitmask)
        applied = time.perf_counter_ns()
        if use_batch and engine.consume_batch is not None:
            oks = engine.consume_batch(matchers, [token] * len(matchers))
        else:
            oks = [engine.consume(matcher, token) for matcher in matchers]
        end = time.perf_counter_ns()
        if not all(oks):
            raise RuntimeError(f"{engine.name}: batch walk refused token {token}")
        fills.append(filled - start)
        applies.append(applied - filled)
        consumes.append(end - applied)
    return {"fill": fills, "apply": applies, "consume": consumes}


def eos_behaviour(engine: Engine, compiled: Any, tokens: list[int], eos: int) -> str:
    matcher = engine.matcher(compiled)
    for token in tokens:
        engine.consume(matcher, token)
    bitmask = new_bitmask(1)
    engine.fill(matcher, bitmask, 0)
    where = "in" if bit(bitmask[0], eos) else "NOT in"
    parts = [f"accepting={engine.accepting(matcher)}",
             f"stopped-before-EOS={engine.stopped(matcher)}",
             f"mask allows {allowed_count(bitmask[0])} token(s), EOS {where} mask"]
    ok = engine.consume(matcher, eos)
    parts.append(f"consume(EOS)={'ok' if ok else 'refused/raises'}")
    parts.append(f"stopped-after-EOS={engine.stopped(matcher)}")
    return ", ".join(parts)


def gil_speedup(engine: Engine, compiled: Any, tokens: list[int], walks: int) -> float:
    """Serial time of 2*walks walks (fresh matcher, fill + consume per token) over the time
    of 2 threads doing `walks` each: ~2 when the fills release the GIL, ~1 when not."""
    masks = [new_bitmask(1), new_bitmask(1)]

    def work(index: int) -> None:
        for _ in range(walks):
            matcher = engine.matcher(compiled)
            for token in tokens:
                engine.fill(matcher, masks[index], 0)
                engine.consume(matcher, token)

    work(0)
    start = time.perf_counter()
    work(0)
    work(1)
    serial = time.perf_counter() - start
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return serial / (time.perf_counter() - start)


def keyword_result(engine: Engine, tok: Any, case: tuple[str, dict[str, Any], Any, Any,
                                                         list[str]]) -> str:
    _, schema, valid, invalid, words = case
    try:
        compiled = engine.compile_json(schema)
    except CompileError as error:
        message = " ".join(str(error).split())
        named = any(re.search(r"(?<![A-Za-z])" + re.escape(w) + r"(?![A-Za-z])", message)
                    for w in words)
        return f"error ({'names it' if named else 'does NOT name it'}): `{message[:110]}`"

    def passes(instance: Any) -> bool:
        matcher = engine.matcher(compiled)
        for token in tok.encode(json.dumps(instance), add_special_tokens=False):
            if not engine.consume(matcher, token):
                return False
        return engine.accepting(matcher)

    warned = engine.warnings(compiled)
    note = f" (warning: `{' '.join(warned[0].split())[:80]}`)" if warned else ""
    if not passes(valid):
        return "REFUSES the valid instance" + note
    if passes(invalid):
        return "silently IGNORED (accepts the breaking instance)" + note
    return "enforced" + note


def check_keyword_cases() -> None:
    """The test data must be right: each valid instance valid, each breaking one not."""
    import jsonschema
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    for name, schema, valid, invalid, _ in KEYWORDS:
        validator = jsonschema.Draft202012Validator(schema, format_checker=checker)
        assert validator.is_valid(valid), name
        if not name.startswith("format"):  # format checks need optional packages
            assert not validator.is_valid(invalid), name
    jsonschema.validate(INSTANCE, SCHEMA)


# ------------------------------------------------------------------------------------ report

def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def f(value: float, digits: int = 1) -> str:
    return "n/a" if value != value else f"{value:,.{digits}f}"


def load_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from app.worker import loading
    folder = loading.transformers_folder(loading.resolve("smollm2"))
    return AutoTokenizer.from_pretrained(folder)


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=4,
                        help="walks per measurement (the first one is reported apart)")
    args = parser.parse_args()

    check_keyword_cases()
    tok = load_tokenizer()
    eos = int(tok.eos_token_id)
    tokens = tok.encode(json.dumps(INSTANCE), add_special_tokens=False)
    tool_text = tok.encode(TEXT_OK, add_special_tokens=False)
    tool_call = tok.encode(CALL_OK, add_special_tokens=False)
    tool_bad = tok.encode(CALL_BAD, add_special_tokens=False)
    rng = np.random.default_rng(0)
    logits1 = rng.standard_normal((1, VOCAB), dtype=np.float32)
    logits8 = rng.standard_normal((BATCH, VOCAB), dtype=np.float32)

    engines: list[Engine] = []
    for engine in (Llguidance(), Xgrammar(), OutlinesCore()):
        if version(engine.package) == "not installed":
            print(f"{engine.name}: not installed, skipped")
        else:
            engines.append(engine)

    print(f"# Grammar engines on SmolLM2's tokenizer ({VOCAB} tokens, EOS {eos}, "
          f"{THREADS} CPUs)\n")
    print("Versions: " + ", ".join(f"{e.name} {version(e.package)}" for e in engines)
          + f", numpy {version('numpy')}, torch {version('torch')}, "
          f"transformers {version('transformers')}\n")
    print(f"10-property instance: {len(tokens)} tokens; {args.repeat} walks per figure.\n")

    setup_rows, compile_rows, single_rows, batch_rows = [], [], [], []
    eos_rows, gil_rows, tool_rows = [], [], []
    keyword_rows: dict[str, list[str]] = {case[0]: [] for case in KEYWORDS}
    masks: list[np.ndarray] = []
    for engine in engines:
        gc.collect()
        _, setup_ms = timed(lambda: engine.setup(tok, eos))
        setup_rows.append([engine.name, f(setup_ms)])

        # 2. compile
        compiled, first_ms = timed(lambda: engine.compile_json(SCHEMA))
        _, second_ms = timed(lambda: engine.compile_json(SCHEMA))
        _, any_ms = timed(lambda: engine.compile_json(ANY_OBJECT))
        _, regex_ms = timed(lambda: engine.compile_regex(REGEX))
        _, choice_ms = timed(lambda: engine.compile_choice(CHOICES))
        new_ns = []
        first_mask_ns = []
        bitmask = new_bitmask(1)
        for _ in range(20):
            matcher, ms = timed(lambda: engine.matcher(compiled))
            new_ns.append(int(ms * 1e6))
            _, ms = timed(lambda: engine.fill(matcher, bitmask, 0))
            first_mask_ns.append(int(ms * 1e6))
        compile_rows.append([engine.name, f(first_ms), f(second_ms), f(any_ms), f(regex_ms),
                             f(choice_ms), f(summary(new_ns)[1]),
                             f(us(first_mask_ns[0])) + " / " + f(summary(first_mask_ns[1:])[1]),
                             engine.cache_note])

        # 3. one row
        fills: list[int] = []
        consumes: list[int] = []
        refused = 0
        for index in range(args.repeat):
            result = walk(engine, engine.matcher(compiled), tokens,
                          masks if engine is engines[0] and index == 0 else None)
            fills += result["fill"]
            consumes += result["consume"]
            refused += result["refused"]
        first = len(tokens)
        warm_fills, warm_consumes = fills[first:], consumes[first:]
        fill_s, consume_s = summary(warm_fills), summary(warm_consumes)
        total = [a + b for a, b in zip(warm_fills, warm_consumes)]
        cold = [a + b for a, b in zip(fills[:first], consumes[:first])]
        single_rows.append([engine.name, f(summary(cold)[0]), f(fill_s[0]), f(fill_s[1]),
                            f(fill_s[2]), f(consume_s[0]), f(consume_s[1]),
                            f(summary(total)[0]), f(summary(total)[2]), str(refused)])

        # 4. eight rows
        for use_batch in (False, True):
            if use_batch and engine.fill_batch is None:
                continue
            agg: dict[str, list[int]] = {"fill": [], "apply": [], "consume": []}
            for _ in range(args.repeat):
                result8 = walk_batch(engine, [engine.matcher(compiled) for _ in range(BATCH)],
                                     tokens, logits8, use_batch)
                for key in agg:
                    agg[key] += result8[key]
            step = [a + b + c for a, b, c in zip(agg["fill"], agg["apply"], agg["consume"])]
            how = "batch helper" if use_batch else "loop over rows"
            batch_rows.append([engine.name, how, f(summary(agg["fill"])[0]),
                               f(summary(agg["fill"])[1]), f(summary(agg["fill"])[2]),
                               f(summary(agg["consume"])[0]), f(summary(agg["apply"])[0]),
                               f(summary(step)[0]), f(summary(step)[2])])

        # EOS and GIL
        eos_rows.append([engine.name, eos_behaviour(engine, compiled, tokens, eos)])
        walk_ms = sum(warm_fills + warm_consumes) / max(1, args.repeat - 1) / 1e6
        walks = max(5, min(200, int(150 / max(walk_ms, 0.01))))
        gil_rows.append([engine.name, f(walk_ms, 2), str(walks),
                         f(gil_speedup(engine, compiled, tokens, walks), 2)])

        # 5. keywords
        for case in KEYWORDS:
            keyword_rows[case[0]].append(keyword_result(engine, tok, case))

        # 6. text or one tool call
        tool_rows += tool_results(engine, tool_text, tool_call, tool_bad, eos)

    print("## 1. Setup (tokenizer/vocabulary, once)\n")
    print(table(["library", "setup ms"], setup_rows) + "\n")
    print("## 2. Compile (ms) and per-request matcher cost\n")
    print(table(["library", "10-prop schema 1st", "same schema 2nd", '{"type":"object"}',
                 "regex", "choice of 3", "new matcher from compiled (us, p50)",
                 "first mask us (1st matcher / p50 of next 19)", "caching"], compile_rows) + "\n")
    print(f"## 3. One row: per-token cost (us), {len(tokens)} tokens x {args.repeat} walks\n")
    print("First walk (fresh grammar: lazy work) vs the warm walks after it:\n")
    print(table(["library", "1st walk fill+consume mean", "fill mean", "fill p50", "fill p99",
                 "consume mean", "consume p50", "fill+consume mean", "fill+consume p99",
                 "tokens refused (should be 0)"], single_rows) + "\n")
    print("Apply kernels (us per call, on the masks of the first walk; float32 logits):\n")
    print(table(["kernel", "1 row mean", "1 row p50", "1 row p99", "8 rows mean"],
                apply_rows(masks, logits1, logits8)) + "\n")
    print(f"## 4. {BATCH} rows per step (us per step for all rows; apply = numpy kernel)\n")
    print(table(["library", "how", "fill mean", "fill p50", "fill p99", "consume mean",
                 "apply mean", "step total mean", "step total p99"], batch_rows) + "\n")
    print("## 5. JSON-schema keywords\n")
    print(table(["keyword"] + [e.name for e in engines],
                [[name] + results for name, results in keyword_rows.items()]) + "\n")
    print('## 6. "text, or exactly one tool call"\n')
    print(table(["library", "written as", "compile ms", "fill mean us", "plain text",
                 "tool call", "call breaking the schema"], tool_rows) + "\n")
    print("## EOS after a complete JSON value (10-property instance)\n")
    print(table(["library", "behaviour"], eos_rows) + "\n")
    print("## GIL: 2 threads each walking fresh matchers vs 1 thread doing both\n")
    print(table(["library", "one warm walk ms", "walks per thread",
                 "speedup (2.0 = all GIL-free, 1.0 = GIL held)"], gil_rows))


def apply_rows(masks: list[np.ndarray], logits1: np.ndarray,
               logits8: np.ndarray) -> list[list[str]]:
    kernels: list[tuple[str, Callable[[np.ndarray, np.ndarray], None]]] = [
        ("numpy unpackbits + copyto(where=) (ours)", apply_numpy)]
    if version("llguidance") != "not installed":
        kernels.append(("llguidance.numpy.apply_token_bitmask_inplace", apply_llguidance_numpy))
    if version("xgrammar") != "not installed" and version("torch") != "not installed":
        kernels.append(("xgrammar.apply_token_bitmask_inplace (cpu, torch.from_numpy)",
                        apply_xgrammar_cpu))
    rows = []
    for name, kernel in kernels:
        one: list[int] = []
        eight: list[int] = []
        for index, mask in enumerate(masks):
            row = logits1.copy()
            start = time.perf_counter_ns()
            kernel(row, mask)
            one.append(time.perf_counter_ns() - start)
            expected = logits1.copy()
            apply_numpy(expected, mask)
            assert np.array_equal(row, expected), name
            if index % 4 == 0:
                rows8 = logits8.copy()
                mask8 = np.repeat(mask, BATCH, axis=0)
                start = time.perf_counter_ns()
                kernel(rows8, mask8)
                eight.append(time.perf_counter_ns() - start)
        s = summary(one)
        rows.append([name, f(s[0]), f(s[1]), f(s[2]), f(summary(eight)[0])])
    return rows


def tool_results(engine: Engine, text: list[int], call: list[int], bad: list[int],
                 eos: int) -> list[list[str]]:
    builders: list[Callable[[], Any]] = [engine.compile_tool]
    if isinstance(engine, Xgrammar):
        builders.append(engine.compile_tool_tag)
    rows = []
    for build in builders:
        try:
            (label, compiled), ms = timed(build)
        except Exception as error:
            rows.append([engine.name, "", "error: `" + " ".join(str(error).split())[:100]
                         + "`", "", "", "", ""])
            continue
        fills: list[int] = []

        def run(tokens: list[int]) -> str:
            """Walk the tokens, then ask for a complete value with EOS allowed."""
            matcher = engine.matcher(compiled)
            bitmask = new_bitmask(1)
            for index, token in enumerate(tokens + [None]):
                start = time.perf_counter_ns()
                engine.fill(matcher, bitmask, 0)
                fills.append(time.perf_counter_ns() - start)
                if token is None:
                    break
                if not bit(bitmask[0], token) or not engine.consume(matcher, token):
                    return f"refused at token {index}/{len(tokens)}"
            if engine.accepting(matcher) and bit(bitmask[0], eos):
                return "accepted, EOS allowed"
            return "incomplete (EOS not allowed)"

        results = [run(text), run(call), run(bad)]
        rows.append([engine.name, label, f(ms), f(summary(fills)[0])] + results)
    return rows


if __name__ == "__main__":
    main()

"""Structured outputs on SmolLM2 (`flaskchat up`'s model), the onnx engine called in process
(no HTTP: what is measured is the grammar's cost inside the continuous batch):

    python bench/structured_speed.py [--tokens 128] [--rounds 3] [--sweep]

1. Compiling a 10-property JSON schema: the first time (checked, compiled, its lexer's
   tables built) and again (the cached grammar, copied for the request).
2. Tokens/s free against constrained to that schema (response_format json_schema): one
   stream, then 8 at once, temperature 0.7, max --tokens each, --rounds rounds. Tokens/s
   is every completion token over the wall time. The model's EOS is ignored, so a free
   reply always runs --tokens tokens; a constrained one ends where its JSON does (the
   prompt it then feeds for its next request counts against it).
3. With --sweep: the onnx engine's total tokens/s at 8 and 16 concurrent free streams for
   --limit-worker-concurrency 5, 8, 16 and 32 (the batch holds at most that many rows),
   for the default's choice (--limits to choose them, --sweep-only to skip 1 and 2).

Not a test: numbers depend on the machine. Run it on an idle one.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "email", "city", "country", "active", "role", "score",
                       "tags", "address"],
          "properties": {
              "name": {"type": "string", "minLength": 10, "maxLength": 40},
              "age": {"type": "integer", "minimum": 0, "maximum": 120},
              "email": {"type": "string", "format": "email"},
              "city": {"type": "string", "minLength": 10, "maxLength": 40},
              "country": {"type": "string", "maxLength": 40},
              "active": {"type": "boolean"},
              "role": {"enum": ["admin", "user", "guest"]},
              "score": {"type": "number"},
              "tags": {"type": "array", "items": {"type": "string", "maxLength": 20},
                       "maxItems": 5},
              "address": {"type": "object", "additionalProperties": False,
                          "required": ["street", "zip"],
                          "properties": {"street": {"type": "string", "minLength": 20,
                                                    "maxLength": 60},
                                         "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
PROMPTS = ["Invent a person who lives in France and describe them.",
           "Describe a software engineer from Japan.",
           "Make up a customer record for a bakery in Italy.",
           "Describe a retired teacher living in Canada.",
           "Invent a football player from Brazil.",
           "Describe a nurse who works in Kenya.",
           "Make up a student record for a university in Germany.",
           "Describe a farmer from New Zealand."]


def load(slots: int) -> Any:
    from app.config import WorkerSettings
    from app.worker.engines import load_chat_model
    from app.worker.loading import resolve

    model = load_chat_model(resolve("smollm2"), WorkerSettings(
        engine="onnx", limit_worker_concurrency=slots, prefix_cache_mib=0))
    model.eos_ids = set()  # free replies run to --tokens (the grammar's end still ends)
    return model


def params(prompt: str, tokens: int, constrained: bool, **extra: Any) -> Any:
    from schemas.worker import GenerationSchema

    body = {"messages": [{"role": "user", "content": prompt}], "max_new_tokens": tokens,
            "temperature": 0.7, "echo": False, **extra}
    if constrained:
        body["response_format"] = FORMAT
    return GenerationSchema().load(body)


def compile_times(model: Any) -> tuple[float, float]:
    started = time.perf_counter()
    model.structured.plan(params("x", 8, True))
    first = time.perf_counter() - started
    started = time.perf_counter()
    model.structured.plan(params("x", 8, True))
    return first * 1e3, (time.perf_counter() - started) * 1e3


def tokens_per_second(model: Any, clients: int, tokens: int, rounds: int,
                      constrained: bool) -> tuple[float, int]:
    """(tokens/s over the wall time, replies that ended by the grammar)."""
    made = [0] * clients
    ended = [0] * clients

    def client(index: int) -> None:
        for turn in range(rounds):
            prompt = PROMPTS[(index + turn) % len(PROMPTS)]
            frames = model.generate(model.prepare(params(prompt, tokens, constrained,
                                                         seed=index * 100 + turn)),
                                    threading.Event())
            final = list(frames)[-1]
            made[index] += final["usage"]["completion_tokens"]
            ended[index] += final["finish_reason"] == "stop"
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(made) / (time.perf_counter() - started), sum(ended)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--limits", type=int, nargs="+", default=[5, 8, 16, 32])
    parser.add_argument("--sweep-only", action="store_true")
    args = parser.parse_args()
    if not args.sweep_only:
        measure(args)
    if args.sweep or args.sweep_only:
        sweep(args)


def measure(args: argparse.Namespace) -> None:
    model = load(16)
    list(model.generate(model.prepare(params("Hi", 8, False)), threading.Event()))  # warm
    first, cached = compile_times(model)
    print(f"10-property schema: first compile {first:.1f} ms, cached {cached:.2f} ms\n")
    print("| streams at once | free tokens/s | constrained tokens/s | ratio | constrained "
          "replies ended by the schema |")
    print("|---|---|---|---|---|")
    for clients in (1, 8):
        free, _ = tokens_per_second(model, clients, args.tokens, args.rounds, False)
        held, ended = tokens_per_second(model, clients, args.tokens, args.rounds, True)
        print(f"| {clients} | {free:.1f} | {held:.1f} | {held / free:.2f} | "
              f"{ended} of {clients * args.rounds} |")


def sweep(args: argparse.Namespace) -> None:
    print("\n| --limit-worker-concurrency | 8 streams tokens/s | 16 streams tokens/s |")
    print("|---|---|---|")
    for slots in args.limits:
        sized = load(slots)
        eight, _ = tokens_per_second(sized, 8, args.tokens, 2, False)
        sixteen, _ = tokens_per_second(sized, 16, args.tokens, 2, False)
        print(f"| {slots} | {eight:.1f} | {sixteen:.1f} |")
        del sized


if __name__ == "__main__":
    main()

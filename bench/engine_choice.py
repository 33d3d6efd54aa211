"""Which CPU engine for the chat worker: decode tokens/s on SmolLM2, 128 tokens, 2 threads.

    pip install ctranslate2   # optional: measured when importable
    python bench/engine_choice.py

- CTranslate2, int8 (the converter's int8): one sequence with generate_tokens, batches of
  8 and 32 with generate_batch (sampling, no early stop).
- onnxruntime with onnx export as the worker builds it (int4 weights), decoding 1, 8 and
  32 rows of the worker's own cache (app.worker.onnx_decoder), greedy.
Not a test: numbers depend on the machine.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.worker import loading  # noqa: E402
from app.worker.onnx_decoder import OnnxDecoder  # noqa: E402
from app.worker.onnx_export import exported  # noqa: E402

TOKENS = 128
BATCHES = (1, 8, 32)


def prompt_ids(folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Write a long story "
                                           "about a dragon."}], tokenize=False,
                                         add_generation_prompt=True)
    ids: list[int] = tokenizer(text)["input_ids"]
    return ids


def onnx_engine(folder: Path, ids: list[int]) -> dict[int, float]:
    decoder = OnnxDecoder(exported(folder), max(BATCHES), len(ids) + TOKENS + 1, 64)
    rates = {}
    for batch in BATCHES:
        tokens = []
        for row in range(batch):
            tokens.append(int(np.argmax(decoder.prefill(row, ids)[-1])))
        started = time.monotonic()
        for _ in range(TOKENS):
            tokens = [int(t) for t in np.argmax(decoder.decode(tokens), axis=-1)]
        rates[batch] = batch * TOKENS / (time.monotonic() - started)
        for row in range(batch):
            decoder.free(row)
    return rates


def ctranslate2_engine(folder: Path, ids: list[int]) -> dict[int, float] | None:
    try:
        import ctranslate2
    except ImportError:
        return None
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(folder).convert_ids_to_tokens(ids)
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(["ct2-transformers-converter", "--model", str(folder), "--output_dir",
                        scratch + "/ct2", "--quantization", "int8", "--force"], check=True,
                       capture_output=True)
        generator = ctranslate2.Generator(scratch + "/ct2", device="cpu", compute_type="int8",
                                          intra_threads=2)
        rates = {}
        started = time.monotonic()
        count = sum(1 for _ in generator.generate_tokens(
            tokens, max_length=TOKENS, sampling_temperature=0.7, end_token=[]))
        rates[1] = count / (time.monotonic() - started)
        for batch in BATCHES[1:]:
            started = time.monotonic()
            results = generator.generate_batch(
                [tokens] * batch, max_length=TOKENS, sampling_temperature=0.7,
                sampling_topk=50, include_prompt_in_result=False, end_token=[])
            count = sum(len(r.sequences_ids[0]) for r in results)
            rates[batch] = count / (time.monotonic() - started)
    return rates


def main() -> None:
    folder = loading.transformers_folder(loading.resolve("smollm2"))
    ids = prompt_ids(folder)
    rows = {"onnxruntime, int4 (the onnx engine's decoder)": onnx_engine(folder, ids)}
    ct2 = ctranslate2_engine(folder, ids)
    if ct2 is not None:
        rows["CTranslate2, int8"] = ct2
    print("| engine | " + " | ".join(f"{b} at once, tokens/s" for b in BATCHES) + " |")
    print("|---|" + "---|" * len(BATCHES))
    for name, rates in rows.items():
        print(f"| {name} | " + " | ".join(f"{rates[b]:.0f}" for b in BATCHES) + " |")


if __name__ == "__main__":
    main()

"""A transformers folder exported once to an ONNX graph with int4 weights, for the onnx engine.

The export is onnxruntime-genai's model builder (its documented command line), which writes
the decoder with GroupQueryAttention and MatMulNBits: on 2 CPU cores SmolLM2-135M decodes
about 3x faster with int4 weights than with int8 and 3.5x faster than float32 (bench/
RESULTS.md, issue 16). The result is cached under ~/.cache/flaskchat/onnx, keyed by the
folder and its files, so every later start loads it in well under a second.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from app.worker.loading import LoadError, cache_dir

log = logging.getLogger("flaskchat.worker")

PRECISION = "int4"
GRAPH = "model.onnx"
FORMAT = "v2"  # bumped when what we do to the builder's graph changes (a new cache entry)
POSITIONS = "logits_positions"


def exported(folder: Path) -> Path:
    """The folder's ONNX export, building it the first time (a LoadError if it cannot be)."""
    target = cache_dir() / "onnx" / \
        f"{folder.name}-{PRECISION}-{FORMAT}-{fingerprint(folder)}"
    if (target / GRAPH).exists():
        return target
    with export_lock(target):
        if (target / GRAPH).exists():  # another process made it meanwhile
            return target
        return _export(folder, target)


@contextmanager
def export_lock(target: Path) -> Iterator[None]:
    """One export of ``target`` at a time, across processes (workers sharing a cache
    folder start together): an exclusive lock on a file beside it. Under it, the partial
    folders that killed exports left are removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for stale in target.parent.glob(f"{target.name}.partial-*"):
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _export(folder: Path, target: Path) -> Path:
    try:
        import onnxruntime_genai  # noqa: F401  (only its model builder is used)
    except ImportError as exc:
        raise LoadError("The onnx engine exports models with onnxruntime-genai's builder, "
                        "which is not installed: pip install -e '.[worker]' (or use "
                        "--engine transformers)") from exc
    log.info("exporting %s to ONNX with %s weights for the onnx engine (once; later starts "
             "load the export at once)", folder, PRECISION)
    started = time.monotonic()
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="flaskchat-export-") as scratch:
        source = _staged(folder, Path(scratch) / "model")
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source),
                   "-o", str(partial), "-p", PRECISION, "-e", "cpu",
                   "-c", str(Path(scratch) / "cache")]
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        if done.returncode != 0 or not (partial / GRAPH).exists():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise LoadError(f"Could not export {folder} to ONNX (use --engine transformers "
                            f"for this model): {tail}")
        _logits_at_positions(partial / GRAPH)
    except Exception:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)  # an incomplete one (no graph)
    partial.rename(target)
    log.info("exported in %.1f s into %s", time.monotonic() - started, target)
    return target


def _logits_at_positions(graph_path: Path) -> None:
    """A `logits_positions` input: the positions whose logits the graph computes. The
    vocabulary projection is a fifth of a prompt's compute, and only the last position's
    logits are needed (all of them only for echoed logprobs)."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    graph = model.graph
    index, head = next((i, n) for i, n in enumerate(graph.node) if "logits" in n.output)
    hidden = head.input[0]
    picked = hidden + "/at_logits_positions"
    graph.node.insert(index, onnx.helper.make_node(
        "Gather", [hidden, POSITIONS], [picked], axis=1, name="/flaskchat/logits_positions"))
    head.input[0] = picked
    graph.input.append(onnx.helper.make_tensor_value_info(POSITIONS, onnx.TensorProto.INT64,
                                                          ["positions"]))
    onnx.save(model, str(graph_path))


def fingerprint(folder: Path) -> str:
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for path in sorted(folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def _staged(folder: Path, stage: Path) -> Path:
    """The folder as links, with an EOS id in config.json when the model has none: the
    builder insists on one for its own runtime config, which this engine does not read."""
    stage.mkdir(parents=True)
    for path in folder.iterdir():
        if path.name != "config.json":
            (stage / path.name).symlink_to(path.resolve())
    config = json.loads((folder / "config.json").read_text())
    if config.get("eos_token_id") is None:
        config["eos_token_id"] = 0
    (stage / "config.json").write_text(json.dumps(config))
    return stage

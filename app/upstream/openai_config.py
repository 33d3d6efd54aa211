"""The OpenAI-compatible upstreams (vLLM, llama.cpp's server, Ollama, TGI, another
gateway) that serve models beside the FastChat workers: which names they serve, where,
with what key and timeouts, and how much traffic each takes.

From ``--openai-upstream NAME=BASE_URL`` (repeatable) and ``--upstreams FILE``:

    [[upstream]]
    base_url = "http://gpu-node-1:8000/v1"
    models = ["llama3"]                       # names clients use; or a table that maps
    # models = { llama3 = "meta-llama/Meta-Llama-3-8B-Instruct" }  # them to the upstream's
    api_key_env = "GPU_NODE_KEY"              # optional: the key is read from this variable
    connect_timeout = 5.0                     # seconds (default: --connect-timeout)
    read_timeout = 600.0                      # longest silence: between stream chunks, or
                                              # for a whole non-stream answer
    weight = 2                                # share of traffic among upstreams of a name
    context_length = 8192                     # optional: the model's context, which bounds
                                              # what a budgeted key's request reserves
    max_concurrency = 8                       # optional: requests it takes at once (all
                                              # its models); more wait in the gateway,
                                              # shared fairly among teams


Mistakes stop the server at start with a message naming the entry and the key.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable
from urllib.parse import urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_READ_TIMEOUT = 600.0
_KEYS = {"base_url", "models", "api_key_env", "connect_timeout", "read_timeout", "weight",
         "context_length", "max_concurrency"}


class UpstreamConfigError(ValueError):
    """A wrong --openai-upstream or --upstreams entry; the message says which and why."""


@dataclass(frozen=True)
class OpenAITarget:
    """One upstream server for one model name."""

    base_url: str  # ".../v1", no trailing slash
    model: str  # the name the upstream knows the model by
    connect_timeout: float
    read_timeout: float = DEFAULT_READ_TIMEOUT
    weight: float = 1.0
    api_key: str = field(default="", repr=False)  # never printed
    context_length: int | None = None  # as the upstreams file gives it
    max_concurrency: int | None = None  # requests it takes at once (None: no gateway queue)

    @property
    def server(self) -> str:
        """Health is kept per server: one that is down is down for all its models."""
        return self.base_url


Targets = dict[str, list[OpenAITarget]]  # client-facing model name -> its upstreams


def load_targets(specs: Iterable[str], path: str, connect_timeout: float,
                 environ: dict[str, str] | None = None) -> Targets:
    environ = dict(os.environ) if environ is None else environ
    targets: Targets = {}
    for spec in specs:
        name, url = _split_spec(spec)
        _add(targets, name, OpenAITarget(url, name, connect_timeout))
    if path:
        for position, entry in enumerate(_read_file(path)):
            where = f"{path}: upstream #{position + 1}"
            for name, target in _entry_targets(entry, where, connect_timeout, environ):
                _add(targets, name, target)
    return targets


def _split_spec(spec: str) -> tuple[str, str]:
    name, sep, url = spec.partition("=")
    if not sep or not name.strip():
        raise UpstreamConfigError(f"--openai-upstream {spec!r}: expected MODEL=BASE_URL, e.g. "
                                  "llama3=http://gpu-node-1:8000/v1")
    return name.strip(), _base_url(url.strip(), f"--openai-upstream {spec!r}")


def _base_url(url: str, where: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UpstreamConfigError(f"{where}: base URL must be http(s)://host[:port]/path, "
                                  f"got {url!r}")
    if parts.query or parts.fragment:
        raise UpstreamConfigError(f"{where}: base URL must not have a query or fragment")
    return url.rstrip("/")


def _read_file(path: str) -> list[Any]:
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise UpstreamConfigError(f"{path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UpstreamConfigError(f"{path}: not valid TOML ({exc})") from None
    unknown = set(document) - {"upstream"}
    if unknown:
        raise UpstreamConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; "
                                  "entries go in [[upstream]] tables")
    entries = document.get("upstream", [])
    if not isinstance(entries, list) or not entries:
        raise UpstreamConfigError(f"{path}: no [[upstream]] entries")
    return entries


def _entry_targets(entry: Any, where: str, connect_timeout: float,
                   environ: dict[str, str]) -> list[tuple[str, OpenAITarget]]:
    if not isinstance(entry, dict):
        raise UpstreamConfigError(f"{where}: must be a table")
    unknown = set(entry) - _KEYS
    if unknown:
        raise UpstreamConfigError(f"{where}: unknown key(s) {sorted(unknown)}; "
                                  f"known: {sorted(_KEYS)}")
    if "base_url" not in entry or not isinstance(entry["base_url"], str):
        raise UpstreamConfigError(f"{where}: base_url is required (a string)")
    url = _base_url(entry["base_url"], where)
    names = _names(entry.get("models"), where)
    key = ""
    if "api_key_env" in entry:
        variable = entry["api_key_env"]
        if not isinstance(variable, str) or not environ.get(variable):
            raise UpstreamConfigError(f"{where}: api_key_env names {variable!r}, which is "
                                      "not set")
        key = environ[variable]
    timeouts = {name: _positive(entry, name, where, default)
                for name, default in (("connect_timeout", connect_timeout),
                                      ("read_timeout", DEFAULT_READ_TIMEOUT),
                                      ("weight", 1.0))}
    context, concurrency = (_whole(entry, name, where)
                            for name in ("context_length", "max_concurrency"))
    return [(name, OpenAITarget(url, upstream_name, timeouts["connect_timeout"],
                                timeouts["read_timeout"], timeouts["weight"], key, context,
                                concurrency))
            for name, upstream_name in names.items()]


def _whole(entry: dict[str, Any], name: str, where: str) -> int | None:
    value = entry.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value <= 0):
        raise UpstreamConfigError(f"{where}: {name} must be a positive whole number, got "
                                  f"{value!r}")
    return value


def _names(models: Any, where: str) -> dict[str, str]:
    if isinstance(models, list) and models and all(isinstance(m, str) and m for m in models):
        return {m: m for m in models}
    if isinstance(models, dict) and models and all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in models.items()):
        return dict(models)
    raise UpstreamConfigError(f"{where}: models must be a non-empty list of names, or a table "
                              "of name = \"upstream's name\"")


def _positive(entry: dict[str, Any], key: str, where: str, default: float) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UpstreamConfigError(f"{where}: {key} must be a positive number, got {value!r}")
    return float(value)


def _add(targets: Targets, name: str, target: OpenAITarget) -> None:
    existing = targets.setdefault(name, [])
    if any(t.base_url == target.base_url for t in existing):
        raise UpstreamConfigError(f"model {name!r} is listed twice for {target.base_url}")
    existing.append(target)

"""Settings for the gateway and the controller: one frozen dataclass each.

Every setting has a command-line flag and a ``FLASKCHAT_*`` environment variable; a flag
beats the variable, which beats the default. FastChat's own variables are honoured as
fallbacks so that an existing FastChat deployment keeps its tuning.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, TypeVar

T = TypeVar("T")


def parse_list(text: str) -> tuple[str, ...]:
    """A JSON array (FastChat's flag format) or a comma-separated list."""
    text = text.strip()
    if text.startswith("["):
        items = json.loads(text)
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"expected a JSON array of strings, got {text!r}")
        return tuple(i.strip() for i in items if i.strip())
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_capacities(specs: Sequence[str]) -> dict[str, int]:
    """``MODEL=N`` items: each model's capacity per worker."""
    found: dict[str, int] = {}
    for spec in specs:
        model, sep, number = spec.rpartition("=")
        try:
            capacity = int(number)
        except ValueError:
            capacity = 0
        if not sep or not model.strip() or capacity < 1:
            raise ValueError(f"expected MODEL=N with N at least 1, got {spec!r}")
        found[model.strip()] = capacity
    return found


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean, got {text!r}")


_DURATION = re.compile(r"^(\d{1,9}(?:\.\d{1,6})?)([smhdw]?)$")
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
MAX_DURATION = 100 * 366 * 86400.0  # what a datetime can still add without overflowing


def parse_duration(text: str) -> float:
    """Seconds from ``45s``, ``90m``, ``12h``, ``30d``, ``2w`` or a plain number of seconds:
    the one duration format of the flags, the environment, the CLI and the admin API."""
    found = _DURATION.match(text.strip())
    if not found:
        raise ValueError(f"expected a duration such as 45s, 90m, 12h, 30d or 2w (or "
                         f"seconds), not {text!r}")
    value = float(found.group(1)) * _DURATION_UNITS[found.group(2)]
    if not 0 < value <= MAX_DURATION:
        raise ValueError(f"a duration must be more than 0 and at most 100 years, not "
                         f"{text!r}")
    return value


_SIZE = re.compile(r"^(\d{1,15})\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2,
               "mb": 1000**2, "mib": 1024**2, "g": 1024**3, "gb": 1000**3, "gib": 1024**3}


def parse_size(text: str) -> int:
    """Bytes from ``512``, ``64KiB``, ``1MiB``, ``2GB`` (``k``/``m``/``g`` alone are
    binary): the one size format of the flags and the environment."""
    found = _SIZE.match(text.strip())
    if not found:
        raise ValueError(f"expected a size such as 65536, 64KiB, 1MiB or 2GB, not {text!r}")
    value = int(found.group(1)) * _SIZE_UNITS[found.group(2).lower()]
    if value <= 0:
        raise ValueError(f"a size must be more than 0, not {text!r}")
    return value


def _positive(cast: Callable[[str], T]) -> Callable[[str], T]:
    def parse(text: str) -> T:
        value = cast(text)
        if value <= 0:  # type: ignore[operator]
            raise ValueError(f"must be positive, got {text!r}")
        return value
    return parse


def read_key_file(path: str) -> tuple[str, ...]:
    """One key per line; blank lines and #-comments are skipped."""
    with open(path, encoding="utf-8") as handle:
        lines = (line.strip() for line in handle)
        return tuple(line for line in lines if line and not line.startswith("#"))


@dataclass(frozen=True)
class Option:
    """How one settings field is spelled on the command line and in the environment."""

    flag: str
    parse: Callable[[str], Any]
    help: str
    env: tuple[str, ...] = ()  # extra variable names, checked after FLASKCHAT_<NAME>
    is_switch: bool = False  # a flag without a value (FastChat's --allow-credentials)
    repeatable: bool = False  # the flag may be given several times; values collect


def _opt(default: Any, flag: str, parse: Callable[[str], Any], help: str,
         env: tuple[str, ...] = (), is_switch: bool = False, repeatable: bool = False) -> Any:
    option = Option(flag, parse, help, env, is_switch, repeatable)
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for defaults")
    return field(default=default, metadata={"option": option})


LOG_FORMATS = ("text", "json")


def _one_of(what: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{what} must be one of {', '.join(choices)}")
        return text
    return parse


_log_format = _one_of("log format", LOG_FORMATS)


def _otlp_traces_endpoint() -> Any:
    """The tracing option every process has (gateway, controller, worker)."""
    return _opt("", "--otlp-traces-endpoint", str,
                "send OpenTelemetry traces over OTLP/HTTP to this URL (or a collector's base "
                "URL); also OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT; off when none is set")


@dataclass(frozen=True)
class Settings:
    """The gateway (API server) settings."""

    host: str = _opt("localhost", "--host", str, "address to bind")
    port: int = _opt(8000, "--port", int, "port to bind")
    otlp_traces_endpoint: str = _otlp_traces_endpoint()
    controller_address: str = _opt(
        "http://localhost:21001", "--controller-address", str,
        "FastChat-protocol controller URL", env=("CONTROLLER_ADDRESS",))
    api_keys: tuple[str, ...] = _opt(
        (), "--api-keys", parse_list,
        "comma-separated API keys; auth is off when none are set (prefer "
        "--api-keys-file or FLASKCHAT_API_KEYS: flags show in ps)", env=("API_KEYS",))
    api_keys_file: str = _opt("", "--api-keys-file", str, "file with one API key per line")
    allow_credentials: bool = _opt(False, "--allow-credentials", parse_bool,
                                   "CORS: allow credentials", is_switch=True)
    allowed_origins: tuple[str, ...] = _opt(
        (), "--allowed-origins", parse_list,
        'CORS origins as a JSON array or comma list, e.g. \'["https://a.example"]\'; '
        "CORS is closed when empty")
    allowed_methods: tuple[str, ...] = _opt(("*",), "--allowed-methods", parse_list,
                                            "CORS methods (JSON array or comma list)")
    allowed_headers: tuple[str, ...] = _opt(("*",), "--allowed-headers", parse_list,
                                            "CORS request headers (JSON array or comma list)")
    workers: int = _opt(1, "--workers", _positive(int), "gunicorn worker processes")
    graceful_timeout: int = _opt(
        120, "--graceful-timeout", _positive(int),
        "seconds a stop (SIGTERM) or reload (SIGHUP) lets running streams finish; those "
        "still running then end with an error event")
    drain_seconds: float = _opt(
        2.0, "--drain-seconds", parse_duration,
        "on a stop or reload: how long the old processes keep accepting (the new ones of a "
        "reload boot meanwhile), and how long an idle keep-alive connection may still "
        "bring a request (answered with Connection: close) before it is closed")
    worker_connections: int = _opt(
        10000, "--worker-connections", _positive(int),
        "open connections per worker process (each stream holds one)")
    connect_timeout: float = _opt(5.0, "--connect-timeout", parse_duration,
                                  "seconds to connect to a worker or the controller")
    read_timeout: float = _opt(
        100.0, "--read-timeout", parse_duration,
        "longest wait, in seconds, between two of a worker's tokens (not for a whole "
        "generation)", env=("FASTCHAT_WORKER_API_TIMEOUT",))
    first_token_timeout: float = _opt(
        0.0, "--first-token-timeout", float,
        "longest wait, in seconds, for a worker's first token (queueing and prompt "
        "included); 0: the read timeout")
    generation_timeout: float = _opt(
        600.0, "--generation-timeout", parse_duration,
        "longest wait, in seconds, for a non-stream answer from a worker that sends "
        "nothing until it is done (stock FastChat workers)")
    embedding_batch_size: int = _opt(
        4, "--embedding-batch-size", _positive(int), "inputs per worker embedding call",
        env=("FASTCHAT_WORKER_API_EMBEDDING_BATCH_SIZE",))
    max_body_bytes: int = _opt(16 * 1024 * 1024, "--max-body-bytes", parse_size,
                               "largest accepted request body (bytes, or 16MiB...)")
    max_n: int = _opt(128, "--max-n", _positive(int),
                      "largest n (choices per prompt) a request may ask for")
    max_inputs: int = _opt(2048, "--max-inputs", _positive(int),
                           "most prompts or embedding inputs in one request")
    models_ttl: float = _opt(3.0, "--models-ttl", parse_duration,
                             "seconds before the cached model/worker list is refreshed "
                             "(in the background; requests never wait for it)")
    worker_info_ttl: float = _opt(
        60.0, "--worker-info-ttl", parse_duration,
        "seconds before a worker's cached template and context length are refreshed")
    keepalive_interval: float = _opt(
        10.0, "--keepalive-interval", parse_duration,
        "seconds between SSE comment lines while a stream waits for its first token")
    max_in_flight: int = _opt(8192, "--max-in-flight", _positive(int),
                              "requests one process works on at once; more wait in a queue")
    max_queued: int = _opt(1024, "--max-queued", int,
                           "requests that may wait for a place; beyond it: 429")
    queue_timeout: float = _opt(10.0, "--queue-timeout", parse_duration,
                                "longest wait, in seconds, for a place; then 429")
    model_capacity: tuple[str, ...] = _opt(
        (), "--model-capacity", parse_list,
        "MODEL=N: generations one worker of MODEL runs at once, for workers that do not "
        "say (flaskchat's worker reports its --limit-worker-concurrency); past it requests "
        "wait in the gateway, shared fairly among teams; repeat the flag for more (the "
        "variable takes a comma list)", repeatable=True)
    flex_queue_timeout: float = _opt(
        600.0, "--flex-queue-timeout", parse_duration,
        "longest wait for a model server at the flex service tier; then 429 (the default "
        "and priority tiers wait --queue-timeout)")
    max_waiting: int = _opt(1000, "--max-waiting", int,
                            "requests that may wait for one model server; beyond it: 429")
    max_waiting_per_team: int = _opt(
        100, "--max-waiting-per-team", int,
        "requests one team (or key without a team) may have waiting for one model server; "
        "beyond it: 429")
    max_worker_in_flight: int = _opt(
        0, "--max-worker-in-flight", int,
        "requests this process sends one worker at once (0: no limit); a worker at the "
        "limit is skipped, and when all are, the answer is 429")
    max_messages: int = _opt(2048, "--max-messages", _positive(int),
                             "most messages in one chat request")
    max_tokens_limit: int = _opt(1_048_576, "--max-tokens-limit", _positive(int),
                                 "largest max_tokens a request may ask for")
    log_level: str = _opt("info", "--log-level", str, "debug, info, warning or error")
    log_format: str = _opt("text", "--log-format", _log_format,
                           "text or json (one JSON object per line)")
    access_log: bool = _opt(True, "--access-log", parse_bool,
                            "one INFO line per request: route, model, status, latency, "
                            "TTFT, tokens (never keys or message content)")
    metrics: bool = _opt(True, "--metrics", parse_bool,
                         "serve Prometheus metrics at /metrics (open to anyone who can "
                         "reach the server unless --metrics-require-admin)")
    metrics_require_admin: bool = _opt(
        False, "--metrics-require-admin", parse_bool,
        "/metrics needs an admin key (Authorization: Bearer, as Prometheus' scrape "
        "'authorization' sends it)", is_switch=True)
    demo: bool = _opt(True, "--demo", parse_bool, "serve the browser demo page at /demo")
    demo_ticket_ttl: float = _opt(30.0, "--demo-ticket-ttl", parse_duration,
                                  "seconds a demo stream ticket stays valid (single use)")
    openai_upstreams: tuple[str, ...] = _opt(
        (), "--openai-upstream", parse_list,
        "MODEL=BASE_URL: serve MODEL from an OpenAI-compatible server (vLLM, llama.cpp, "
        "Ollama, TGI...), e.g. llama3=http://gpu-1:8000/v1; repeat the flag for more "
        "(the variable takes a comma list)", repeatable=True)
    upstreams_file: str = _opt(
        "", "--upstreams", str,
        "TOML file of OpenAI-compatible upstreams (names, base URL, key variable, "
        "timeouts, weight): see docs/scale-out.md")
    state_dir: str = _opt(
        "", "--state-dir", str,
        "directory the worker processes share (metrics files, demo tickets); empty: a "
        "private temporary directory made at start")
    database_url: str = _opt(
        "", "--database-url", str,
        "database of API keys and usage: sqlite:///PATH or postgresql://USER@HOST/NAME "
        "(several hosts); empty: an SQLite file in $XDG_DATA_HOME/flaskchat, else "
        "~/.local/share/flaskchat")
    redis_url: str = _opt(
        "", "--redis-url", str,
        "Redis for rate-limit counters shared by several processes or hosts, e.g. "
        "redis://HOST:6379/0; without it each process enforces its share of a limit")
    admin_keys: tuple[str, ...] = _opt(
        (), "--admin-keys", parse_list,
        "keys for the admin API and page (/admin); prefer --admin-keys-file or "
        "FLASKCHAT_ADMIN_KEYS (flags show in ps); none: /admin is closed")
    admin_keys_file: str = _opt("", "--admin-keys-file", str,
                                "file with one admin key per line")
    require_auth: bool = _opt(
        False, "--require-auth", parse_bool,
        "refuse every model request without a valid key, even when no key is configured "
        "yet (recommended for a shared server: auth is otherwise off until a key exists)",
        is_switch=True)
    tpm_estimate: int = _opt(
        256, "--tpm-estimate", _positive(int),
        "completion tokens per choice a request without max_tokens reserves against its "
        "key's tokens-per-minute limit (settled to what it used when it ends)")
    usage_retention: float = _opt(
        30 * 86400.0, "--usage-retention", parse_duration,
        "how long usage records are kept one per request (30d, 12h...); older ones are "
        "kept only as their per-day sums per key and model")
    keys_refresh: float = _opt(
        2.0, "--keys-refresh", parse_duration,
        "seconds between reads of the API keys that changed (a revoked or changed key "
        "takes effect on every host within this)")
    usage_flush_interval: float = _opt(
        1.0, "--usage-flush-interval", parse_duration,
        "seconds between writes of the usage records (what a SIGKILL can lose at most)")
    usage_buffer: int = _opt(
        100_000, "--usage-buffer", _positive(int),
        "usage records kept per process while the database cannot be written; beyond it "
        "the oldest are dropped (logged and counted)")
    metrics_key_labels: int = _opt(
        100, "--metrics-key-labels", int,
        "key names each process uses as metric labels; further keys count as '_other' "
        "(0: no per-key metrics)")
    responses_ttl: float = _opt(
        30 * 86400.0, "--responses-ttl", parse_duration,
        "how long a stored Responses API response is kept (30d, 12h, 90m, or seconds)")
    responses_max: int = _opt(
        100_000, "--responses-max", _positive(int),
        "stored responses kept at most; beyond it the oldest are deleted first")
    responses_max_bytes: int = _opt(
        1024 * 1024, "--responses-max-bytes", parse_size,
        "largest stored response (its input, the turns it replays and its output); a "
        "larger one is answered but not stored (its 'store' is false), or refused with "
        "400 when the request asks for 'store': true")
    responses_key_quota: int = _opt(
        256 * 1024 * 1024, "--responses-key-quota", parse_size,
        "stored responses' bytes each key may keep; past it its oldest are deleted first")
    responses_key_max: int = _opt(
        10_000, "--responses-key-max", _positive(int),
        "stored responses each key may keep; past it its oldest are deleted first (so no "
        "key can push the others' out of --responses-max)")
    env_file: str = _opt(
        "", "--env-file", str,
        "file of FLASKCHAT_* variables (KEY=VALUE lines) that beat the environment and are "
        "read again by every reload (SIGHUP): new keys, log level, limits without a "
        "restart")

    def __post_init__(self) -> None:
        if self.api_keys_file and not self.api_keys:
            object.__setattr__(self, "api_keys", read_key_file(self.api_keys_file))
        if self.admin_keys_file and not self.admin_keys:
            object.__setattr__(self, "admin_keys", read_key_file(self.admin_keys_file))
        object.__setattr__(self, "controller_address", self.controller_address.rstrip("/"))
        if self.first_token_timeout <= 0:
            object.__setattr__(self, "first_token_timeout", self.read_timeout)
        try:
            parse_capacities(self.model_capacity)
        except ValueError as exc:
            raise SystemExit(f"invalid --model-capacity: {exc}") from None

    @property
    def model_capacities(self) -> dict[str, int]:
        """--model-capacity: each model's capacity per worker."""
        return parse_capacities(self.model_capacity)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        return _build(cls, None, os.environ if environ is None else environ)

    @classmethod
    def from_args(cls, args: argparse.Namespace,
                  environ: Mapping[str, str] | None = None) -> "Settings":
        return _build(cls, args, os.environ if environ is None else environ)


DISPATCH_METHODS = ("shortest_queue", "lottery")
DTYPES = ("auto", "float32", "float16", "bfloat16")


_dtype = _one_of("dtype", DTYPES)
ENGINES = ("auto", "onnx", "transformers")
_engine = _one_of("engine", ENGINES)
_dispatch = _one_of("dispatch method", DISPATCH_METHODS)


@dataclass(frozen=True)
class ControllerSettings:
    """The controller settings. FLASKCHAT_CONTROLLER_* variables, FastChat's as fallback."""

    host: str = _opt("localhost", "--host", str, "address to bind")
    port: int = _opt(21001, "--port", int, "port to bind")
    otlp_traces_endpoint: str = _otlp_traces_endpoint()
    dispatch_method: str = _opt("shortest_queue", "--dispatch-method", _dispatch,
                                "shortest_queue or lottery")
    heart_beat_expiration: float = _opt(
        90.0, "--heart-beat-expiration", parse_duration,
        "seconds without a heartbeat before a worker is dropped",
        env=("FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION",))
    worker_api_timeout: float = _opt(
        100.0, "--worker-api-timeout", parse_duration,
        "longest silence, in seconds, of a worker whose stream the controller proxies "
        "(FastChat's /worker_generate_stream on the controller)",
        env=("FASTCHAT_WORKER_API_TIMEOUT",))
    worker_secret: str = _opt(
        "", "--worker-secret", str,
        "shared secret workers must send (Authorization: Bearer) to register, heartbeat or "
        "refresh; prefer FLASKCHAT_CONTROLLER_WORKER_SECRET (flags show in ps)")
    log_level: str = _opt("info", "--log-level", str, "debug, info, warning or error")

    @classmethod
    def from_args(cls, args: argparse.Namespace,
                  environ: Mapping[str, str] | None = None) -> "ControllerSettings":
        return _build(cls, args, os.environ if environ is None else environ,
                      prefix="FLASKCHAT_CONTROLLER_")


# The worker's generations at once when --limit-worker-concurrency is not given: the onnx
# engine's batch is fastest at 16 rows here (bench/structured_speed.py --sweep; a row's
# cache is allocated as it fills, so idle rows cost nothing), the others keep FastChat's 5.
ONNX_CONCURRENCY = 16
FASTCHAT_CONCURRENCY = 5


@dataclass(frozen=True)
class WorkerSettings:
    """The model worker settings (FastChat's model_worker flags). FLASKCHAT_WORKER_*."""

    host: str = _opt("localhost", "--host", str, "address to bind")
    port: int = _opt(21002, "--port", int, "port to bind")
    otlp_traces_endpoint: str = _otlp_traces_endpoint()
    worker_address: str = _opt("", "--worker-address", str,
                               "URL the controller and gateways use to reach this worker "
                               "(default: http://HOST:PORT)")
    controller_address: str = _opt("http://localhost:21001", "--controller-address", str,
                                   "controller to register with")
    model_path: str = _opt("smollm2", "--model-path", str,
                           "a transformers folder, a .gguf file, a sentence-transformers "
                           "folder, or an embedded model: smollm2, all-minilm-l6-v2")
    model_names: tuple[str, ...] = _opt((), "--model-names", parse_list,
                                        "comma-separated names to serve the model as")
    limit_worker_concurrency: int = _opt(0, "--limit-worker-concurrency", _positive(int),
                                         "generations (or embedding batches) at once; "
                                         "default: the engine's (onnx: the batch it runs "
                                         "fastest, 16; otherwise FastChat's 5)")
    engine: str = _opt("auto", "--engine", _engine,
                       "onnx (onnxruntime, int4 weights, continuous batching; CPU), "
                       "transformers (PyTorch, one sequence at a time), or auto: onnx on a "
                       "CPU when the model exports, else transformers")
    max_context: int = _opt(4096, "--max-context", _positive(int),
                            "onnx engine: the most tokens (prompt + reply) one request may "
                            "use; the key-value cache holds this many per slot")
    prefix_cache_mib: int = _opt(64, "--prefix-cache-mib", int,
                                 "onnx engine: memory for the keys and values of recent "
                                 "prompts, reused by prompts that start alike (0: off)")
    device: str = _opt("cpu", "--device", str, "cpu, cuda or mps")
    dtype: str = _opt("auto", "--dtype", _dtype,
                      "auto (float16 on a GPU, float32 on CPU), float32, float16 or bfloat16")
    no_register: bool = _opt(False, "--no-register", parse_bool,
                             "do not register with the controller", is_switch=True)
    conv_template: str = _opt("", "--conv-template", str,
                              "FastChat conversation template for models without a chat "
                              "template (e.g. vicuna_v1.1, llama-2, chatml)")
    stream_interval: int = _opt(2, "--stream-interval", _positive(int),
                                "tokens between streamed frames")
    heart_beat_interval: float = _opt(45.0, "--heart-beat-interval", parse_duration,
                                      "seconds between heartbeats",
                                      env=("FASTCHAT_WORKER_HEART_BEAT_INTERVAL",))
    controller_secret: str = _opt(
        "", "--controller-secret", str,
        "the controller's --worker-secret; prefer FLASKCHAT_WORKER_CONTROLLER_SECRET")
    log_level: str = _opt("info", "--log-level", str, "debug, info, warning or error")

    @property
    def address(self) -> str:
        return (self.worker_address or f"http://{self.host}:{self.port}").rstrip("/")

    def concurrency(self, engine: str) -> int:
        """--limit-worker-concurrency, else the default of the engine the model runs on."""
        if self.limit_worker_concurrency:
            return self.limit_worker_concurrency
        return ONNX_CONCURRENCY if engine == "onnx" else FASTCHAT_CONCURRENCY

    @classmethod
    def from_args(cls, args: argparse.Namespace,
                  environ: Mapping[str, str] | None = None) -> "WorkerSettings":
        return _build(cls, args, os.environ if environ is None else environ,
                      prefix="FLASKCHAT_WORKER_")


S = TypeVar("S")


def read_env_file(path: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (as systemd's EnvironmentFile): blank lines and #-comments are
    skipped, an ``export`` prefix and quotes around the value are allowed."""
    values: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, value = line.removeprefix("export ").partition("=")
            if not sep or not name.strip():
                raise SystemExit(f"{path}:{number}: expected NAME=value")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[name.strip()] = value
    return values


def _build(cls: type[S], args: argparse.Namespace | None, environ: Mapping[str, str],
           prefix: str = "FLASKCHAT_") -> S:
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    env_file = getattr(args, "env_file", None) or environ.get(prefix + "ENV_FILE", "")
    if env_file and any(f.name == "env_file" for f in fields):
        try:
            environ = {**environ, **read_env_file(env_file)}  # the file beats the environment
        except OSError as exc:
            raise SystemExit(f"cannot read the env file {env_file}: {exc.strerror}") from None
    values: dict[str, Any] = {}
    for f in fields:
        option: Option = f.metadata["option"]
        given = getattr(args, f.name, None) if args is not None else None
        if given is not None:
            values[f.name] = tuple(given) if option.repeatable else given
            continue
        for name in (prefix + f.name.upper(),) + option.env:
            if environ.get(name, "") != "":
                try:
                    values[f.name] = option.parse(environ[name])
                except ValueError as exc:
                    raise SystemExit(f"invalid {name}: {exc}") from None
                break
    return cls(**values)


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any],
                  skip: Sequence[str] = ()) -> None:
    """Adds one flag per settings field; unset flags stay None so env vars can fill them."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        option: Option = f.metadata["option"]
        help_text = f"{option.help} (default: {f.default!r})"
        if option.is_switch:
            parser.add_argument(option.flag, dest=f.name, action="store_const", const=True,
                                default=None, help=help_text)
        elif option.repeatable:
            parser.add_argument(option.flag, dest=f.name, action="append", default=None,
                                help=help_text)
        else:
            parser.add_argument(option.flag, dest=f.name, type=option.parse, default=None,
                                help=help_text)

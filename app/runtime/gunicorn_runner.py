"""gunicorn for each of flaskchat's processes: its settings (defined here once: both
``flaskchat serve`` and ``gunicorn -c gunicorn.conf.py wsgi:app`` take the gateway's from
``gateway_config``), the gateway's settings as a reload finds them, and a runner that
starts the arbiter in this process.

Imports nothing that must come after gevent's patching: the arbiter loads this module.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any, Callable

from gunicorn.app.base import BaseApplication

from app.config import ONNX_CONCURRENCY, ControllerSettings, Settings, WorkerSettings
from app.runtime import state_dir
from app.upstream.openai_config import Targets

KEEPALIVE = 75  # callers reuse their connections; gunicorn's default is 2 s
log = logging.getLogger("flaskchat.runtime")

# The gateway settings the arbiter last loaded and checked, and the upstreams it read for
# them. Held here, in the arbiter's memory, because its workers are forked from it: each
# new worker starts from exactly what its reload accepted, not from files that may have
# changed since. (State of the arbiter process, not of any app.)
_accepted: Settings | None = None
_accepted_targets: Targets | None = None


def gateway_settings(build: Callable[[], Settings]) -> Settings:
    """The gateway's settings as the flags, the environment and the env file give them now
    (the API keys and upstreams files read afresh), checked, with the shared state
    directory made. Called at start and on every reload (SIGHUP); a reload whose settings
    do not load keeps the last good ones, and says why on stderr. At start, the error
    goes to the caller."""
    global _accepted, _accepted_targets
    from app.upstream.openai_config import UpstreamConfigError, load_targets

    try:
        settings = build()
        targets = load_targets(settings.openai_upstreams, settings.upstreams_file,
                               settings.connect_timeout)
        if _accepted is None or (settings.database_url, settings.redis_url) != \
                (_accepted.database_url, _accepted.redis_url):
            _check_storage(settings)
    except (SystemExit, UpstreamConfigError, OSError) as exc:
        if _accepted is None:
            raise
        print(f"flaskchat: reload kept the settings in use; the new ones do not load: "
              f"{exc}", file=sys.stderr, flush=True)
        return _accepted
    if _accepted is None and settings.workers > 1 and not settings.redis_url:
        print(f"flaskchat: warning: {settings.workers} processes and no --redis-url: each "
              f"process enforces 1/{settings.workers} of every key's rpm, tpm and parallel "
              "limit (set --redis-url to share exact counters)", file=sys.stderr, flush=True)
    if _accepted is None and settings.workers > 1 and not settings.redis_url:
        print(f"flaskchat: warning: {settings.workers} processes: each sends a model server "
              f"whose capacity is known 1/{settings.workers} of it (at least one request "
              "at a time), and keeps its own fair-share line (set --redis-url to share "
              "them)", file=sys.stderr, flush=True)
    if _accepted is None:  # before the first fork: the workers share it
        settings = dataclasses.replace(settings, state_dir=state_dir.prepare(
            settings.state_dir))
    else:
        settings = dataclasses.replace(settings, state_dir=_accepted.state_dir)
    _accepted, _accepted_targets = settings, targets
    return settings


def _check_storage(settings: Settings) -> None:
    """The key database (and Redis), checked in a child process, since this one must not
    import their drivers (see ``app.access.preflight``); raises SystemExit if unusable."""
    import os
    import subprocess

    env = {**os.environ, "FLASKCHAT_ENV_FILE": "",
           "FLASKCHAT_DATABASE_URL": settings.database_url,
           "FLASKCHAT_REDIS_URL": settings.redis_url}
    if subprocess.run([sys.executable, "-m", "app.access.preflight"], env=env).returncode:
        raise SystemExit("the key database cannot be used (see above)")


def accepted_gateway_settings() -> tuple[Settings, Targets | None]:
    """In a gateway worker: the settings and upstreams its arbiter accepted (or, outside
    gunicorn, the environment's settings, with the upstreams left to be read)."""
    if _accepted is None:
        return Settings.from_env(), None
    return _accepted, _accepted_targets


def gateway_config(settings: Settings) -> dict[str, Any]:
    return {
        "bind": [f"{settings.host}:{settings.port}"],
        "workers": settings.workers,
        # gunicorn's gevent worker; a graceful stop also closes idle keep-alive connections
        "worker_class": "app.runtime.gevent_worker.GeventWorker",
        # Each open stream holds one connection; gunicorn's default of 1,000 caps a process
        # too low.
        "worker_connections": settings.worker_connections,
        # For gevent workers this only catches a hub blocked this long; streams are bounded
        # by the upstream read timeout instead, so it must be neither 0 nor stream-length.
        "timeout": 60,
        "graceful_timeout": settings.graceful_timeout,  # running streams finish on a deploy
        "keepalive": KEEPALIVE,
        # requests and urllib3 must be imported after the worker has patched (ssl).
        "preload_app": False,
        "control_socket_disable": True,
        "loglevel": settings.log_level,
        "child_exit": _child_exit,
    }


def controller_config(settings: ControllerSettings) -> dict[str, Any]:
    # The registry lives in process memory: exactly one process, threads for concurrency.
    return {"bind": [f"{settings.host}:{settings.port}"], "workers": 1,
            "worker_class": "gthread", "threads": 16, "timeout": 60, "keepalive": KEEPALIVE,
            "control_socket_disable": True, "loglevel": settings.log_level}


def worker_config(settings: WorkerSettings) -> dict[str, Any]:
    # Never monkey-patched: generation is CPU/GPU-bound and runs in real threads. One
    # process holds one copy of the model; the long timeout covers a first GGUF conversion.
    return {"bind": [f"{settings.host}:{settings.port}"], "workers": 1,
            "worker_class": "gthread",
            "threads": (settings.limit_worker_concurrency or ONNX_CONCURRENCY) + 16,
            "timeout": 300, "keepalive": KEEPALIVE, "control_socket_disable": True,
            "loglevel": settings.log_level}


def run(load: Callable[[], Any], configure: Callable[[], dict[str, Any]],
        fd: int | None = None, log_level: str | None = None) -> int:
    """Runs gunicorn in this process: ``configure()`` gives its settings, at start and
    again on every reload (SIGHUP); ``load()`` builds the app in each worker process. With
    ``log_level``, logging is set up before that (the gateway's app does its own); with
    ``fd``, gunicorn serves that already bound socket (tests)."""
    def configured_load() -> Any:
        if log_level is not None:
            from app.telemetry.logs import configure_logging

            configure_logging(log_level)
        return load()

    def options() -> dict[str, Any]:
        config = configure()
        return {**config, "bind": [f"fd://{fd}"]} if fd is not None else config

    _Gunicorn(configured_load, options).run()
    return 0


def _child_exit(server: Any, worker: Any) -> None:
    state_dir.worker_exited(worker.pid)


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, loader: Callable[[], Any],
                 options: Callable[[], dict[str, Any]]) -> None:
        self._loader = loader
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        """At start and on every reload."""
        for key, value in self._options().items():
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self) -> Any:
        return self._loader()

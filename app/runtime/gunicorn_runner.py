"""gunicorn for each of flaskchat's processes: its settings (defined here once: both
``flaskchat serve`` and ``gunicorn -c gunicorn.conf.py wsgi:app`` take the gateway's from
``gateway_config``) and a runner that starts the arbiter in this process.

Imports nothing that must come after gevent's patching: the arbiter loads this module.
"""
from __future__ import annotations

from typing import Any, Callable

from gunicorn.app.base import BaseApplication

from app.config import ControllerSettings, Settings, WorkerSettings
from app.runtime import state_dir

KEEPALIVE = 75  # callers reuse their connections; gunicorn's default is 2 s


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
            "worker_class": "gthread", "threads": settings.limit_worker_concurrency + 16,
            "timeout": 300, "keepalive": KEEPALIVE, "control_socket_disable": True,
            "loglevel": settings.log_level}


def run(load: Callable[[], Any], config: dict[str, Any], fd: int | None = None,
        log_level: str = "info", log_format: str = "text") -> int:
    """Runs gunicorn with ``config`` on ``fd`` (a socket a test bound) or its bind, and
    ``load`` building the app in each worker process, after logging is set up there."""
    def configured_load() -> Any:
        from app.telemetry.logs import configure_logging

        configure_logging(log_level, log_format)
        return load()

    options = {**config, "bind": [f"fd://{fd}"]} if fd is not None else config
    _Gunicorn(configured_load, options).run()
    return 0


def _child_exit(server: Any, worker: Any) -> None:
    state_dir.worker_exited(worker.pid)


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, loader: Callable[[], Any], options: dict[str, Any]) -> None:
        self._loader = loader
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self) -> Any:
        return self._loader()

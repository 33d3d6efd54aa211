"""The ``flaskchat`` console script: serve | controller.

Flags become Settings here and nowhere else. The gateway and the controller run under
gunicorn; this process is gunicorn's arbiter and never imports requests, so the gevent
workers patch before requests is first imported.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

from gunicorn.app.base import BaseApplication

from app.config import ControllerSettings, Settings, add_arguments


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flaskchat", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the OpenAI-compatible API server")
    add_arguments(serve, Settings)
    serve.add_argument("--fd", type=int, help=argparse.SUPPRESS)  # tests: a bound socket
    serve.set_defaults(run=_serve)

    controller = commands.add_parser("controller", help="run a FastChat-protocol controller")
    add_arguments(controller, ControllerSettings)
    controller.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    controller.set_defaults(run=_controller)

    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


def _serve(args: argparse.Namespace) -> int:
    settings = Settings.from_args(args)

    def load() -> Any:
        from app import create_app
        return create_app(settings)

    options = {
        "bind": _bind(args.fd, settings.host, settings.port),
        "workers": settings.workers,
        "worker_class": "gevent",
        "worker_connections": settings.worker_connections,
        "timeout": 60,  # only catches a blocked hub; streams are bounded by read_timeout
        "graceful_timeout": 120,
        "keepalive": 75,
        "control_socket_disable": True,
        "loglevel": settings.log_level,
    }
    print(f"flaskchat: serving the API on http://{settings.host}:{settings.port}/v1 "
          f"(controller {settings.controller_address})", file=sys.stderr, flush=True)
    _Gunicorn(load, options).run()
    return 0


def _controller(args: argparse.Namespace) -> int:
    settings = ControllerSettings.from_args(args)

    def load() -> Any:
        from app.controller import create_controller_app
        return create_controller_app(settings)

    # The registry lives in process memory: exactly one process, threads for concurrency.
    options = {
        "bind": _bind(args.fd, settings.host, settings.port),
        "workers": 1,
        "worker_class": "gthread",
        "threads": 16,
        "keepalive": 75,  # gateways poll it every few seconds over one connection
        "timeout": 60,
        "control_socket_disable": True,
        "loglevel": settings.log_level,
    }
    _Gunicorn(load, options).run()
    return 0


def _bind(fd: int | None, host: str, port: int) -> list[str]:
    return [f"fd://{fd}"] if fd is not None else [f"{host}:{port}"]


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


if __name__ == "__main__":
    sys.exit(main())

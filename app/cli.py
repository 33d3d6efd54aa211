"""The ``flaskchat`` console script: up | serve | controller | worker.

Flags become Settings here and nowhere else. The gateway and the controller run under
gunicorn; this process is gunicorn's arbiter and never imports requests, so the gevent
workers patch before requests is first imported.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

from gunicorn.app.base import BaseApplication

from app.config import (ControllerSettings, Settings, WorkerSettings, add_arguments,
                        parse_list, read_key_file)


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

    worker = commands.add_parser("worker", help="run a FastChat-protocol model worker")
    add_arguments(worker, WorkerSettings)
    worker.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    worker.set_defaults(run=_worker)

    up = commands.add_parser("up", help="controller + chat and embedding workers + API "
                             "server, on the embedded models, in one command")
    up.add_argument("--host", default="localhost", help="API server address")
    up.add_argument("--port", type=int, default=8000, help="API server port")
    up.add_argument("--chat-model", default="smollm2",
                    help="model path or embedded name for the chat worker ('none' to skip)")
    up.add_argument("--embedding-model", default="all-minilm-l6-v2",
                    help="model path or embedded name for the embedding worker ('none' to skip)")
    up.add_argument("--api-keys", type=parse_list, default=None,
                    help="comma-separated API keys (or FLASKCHAT_API_KEYS)")
    up.add_argument("--api-keys-file", default=None, help="file with one API key per line")
    up.add_argument("--workers", type=int, default=1, help="API server processes")
    up.add_argument("--limit-worker-concurrency", type=int, default=5)
    up.add_argument("--controller-port", type=int, default=0, help="0: any free port")
    up.set_defaults(run=_up)

    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


def _serve(args: argparse.Namespace) -> int:
    import dataclasses

    from app.runtime import state_dir

    settings = Settings.from_args(args)
    from app.upstream.openai_config import UpstreamConfigError, load_targets
    try:  # a wrong upstream entry stops here, clearly, not in every worker process
        load_targets(settings.openai_upstreams, settings.upstreams_file,
                     settings.connect_timeout)
    except UpstreamConfigError as exc:
        print(f"flaskchat serve: {exc}", file=sys.stderr)
        return 2
    # Before the fork: the workers share metric files and demo tickets through it.
    settings = dataclasses.replace(settings, state_dir=state_dir.prepare(settings.state_dir))

    def load() -> Any:
        from app import create_app
        return create_app(settings)

    options = {
        "workers": settings.workers,
        "worker_class": "app.runtime.gevent_worker.GeventWorker",
        "worker_connections": settings.worker_connections,
        "timeout": 60,  # only catches a blocked hub; streams are bounded by read_timeout
        "graceful_timeout": settings.graceful_timeout,  # running streams finish on a deploy
        "child_exit": lambda _arbiter, worker: state_dir.worker_exited(worker.pid),
    }
    print(f"flaskchat: serving the API on http://{settings.host}:{settings.port}/v1 "
          f"(controller {settings.controller_address})", file=sys.stderr, flush=True)
    return _run_gunicorn(load, args.fd, settings.host, settings.port, settings.log_level,
                         options)


def _controller(args: argparse.Namespace) -> int:
    settings = ControllerSettings.from_args(args)

    def load() -> Any:
        from app.controller import create_controller_app
        return create_controller_app(settings)

    # The registry lives in process memory: exactly one process, threads for concurrency.
    options = {"workers": 1, "worker_class": "gthread", "threads": 16, "timeout": 60}
    return _run_gunicorn(load, args.fd, settings.host, settings.port, settings.log_level,
                         options)


def _worker(args: argparse.Namespace) -> int:
    from app.worker.loading import LoadError, resolve

    settings = WorkerSettings.from_args(args)
    try:
        resolve(settings.model_path)  # a wrong path fails here, clearly, before any fork
    except LoadError as exc:
        print(f"flaskchat worker: {exc}", file=sys.stderr)
        return 2

    def load() -> Any:
        from app.worker import create_worker_app
        return create_worker_app(settings)

    # Never monkey-patched: generation is CPU/GPU-bound and runs in real threads. One
    # process holds one copy of the model; the long timeout covers a first GGUF conversion.
    options = {"workers": 1, "worker_class": "gthread",
               "threads": settings.limit_worker_concurrency + 16, "timeout": 300}
    return _run_gunicorn(load, args.fd, settings.host, settings.port, settings.log_level,
                         options)


def _up(args: argparse.Namespace) -> int:
    import os

    from app.runtime.launcher import Plan, Stack
    from app.worker.loading import LoadError, resolve

    keys: tuple[str, ...] = args.api_keys or ()
    if args.api_keys_file:
        keys = read_key_file(args.api_keys_file)
    elif not keys and os.environ.get("FLASKCHAT_API_KEYS"):
        keys = parse_list(os.environ["FLASKCHAT_API_KEYS"])
    for model in (args.chat_model, args.embedding_model):
        if model.lower() != "none":
            try:
                resolve(model)
            except LoadError as exc:
                print(f"flaskchat up: {exc}", file=sys.stderr)
                return 2
    plan = Plan(host=args.host, port=args.port, chat_model=args.chat_model,
                embedding_model=args.embedding_model, api_keys=keys, workers=args.workers,
                concurrency=args.limit_worker_concurrency,
                controller_port=args.controller_port)
    return Stack(plan).run()


def _run_gunicorn(load: Callable[[], Any], fd: int | None, host: str, port: int,
                  log_level: str, options: dict[str, Any]) -> int:
    _Gunicorn(load, {
        "bind": [f"fd://{fd}"] if fd is not None else [f"{host}:{port}"],
        "keepalive": 75,  # callers reuse their connections; gunicorn's default is 2 s
        "control_socket_disable": True,
        "loglevel": log_level,
        **options,
    }).run()
    return 0


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

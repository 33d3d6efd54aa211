"""The ``flaskchat`` console script: up | serve | controller | worker.

Flags become Settings here and nowhere else. The gateway and the controller run under
gunicorn; this process is gunicorn's arbiter and never imports requests, so the gevent
workers patch before requests is first imported.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

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
    from app.runtime import gunicorn_runner
    from app.upstream.openai_config import UpstreamConfigError

    def settings() -> Settings:
        return gunicorn_runner.gateway_settings(lambda: Settings.from_args(args))

    try:  # a wrong setting stops here, clearly, not in every worker process
        started = settings()
    except (UpstreamConfigError, OSError) as exc:
        print(f"flaskchat serve: {exc}", file=sys.stderr)
        return 2

    def load() -> Any:
        from app import create_app
        return create_app(*gunicorn_runner.accepted_gateway_settings())

    print(f"flaskchat: serving the API on http://{started.host}:{started.port}/v1 "
          f"(controller {started.controller_address})", file=sys.stderr, flush=True)
    return gunicorn_runner.run(load, lambda: gunicorn_runner.gateway_config(settings()),
                               args.fd)


def _controller(args: argparse.Namespace) -> int:
    from app.runtime import gunicorn_runner

    settings = ControllerSettings.from_args(args)

    def load() -> Any:
        from app.controller import create_controller_app
        return create_controller_app(settings)

    return gunicorn_runner.run(load, lambda: gunicorn_runner.controller_config(settings),
                               args.fd, settings.log_level)


def _worker(args: argparse.Namespace) -> int:
    from app.runtime import gunicorn_runner
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

    return gunicorn_runner.run(load, lambda: gunicorn_runner.worker_config(settings),
                               args.fd, settings.log_level)


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


if __name__ == "__main__":
    sys.exit(main())

"""The ``flaskchat`` console script: up | serve | controller | worker | keys | usage | db.

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
from app.scheduling.tiers import TIERS

# app.access.keys.AUTO_TIER, not imported from there: that would load SQLAlchemy into
# every command, gunicorn's arbiter included.
AUTO_TIER = "auto"


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
    up.add_argument("--limit-worker-concurrency", type=int, default=0,
                    help="generations at once in each worker (default: the engine's)")
    up.add_argument("--controller-port", type=int, default=0, help="0: any free port")
    up.add_argument("--otlp-traces-endpoint", default="",
                    help="OpenTelemetry traces of every process to this OTLP/HTTP URL")
    up.set_defaults(run=_up)

    _add_access_commands(commands)
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
    except SystemExit as exc:
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
    if args.otlp_traces_endpoint:  # every process of the stack reads it from there
        from app.telemetry.tracing import endpoint

        os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = \
            endpoint(args.otlp_traces_endpoint) or ""
    plan = Plan(host=args.host, port=args.port, chat_model=args.chat_model,
                embedding_model=args.embedding_model, api_keys=keys, workers=args.workers,
                concurrency=args.limit_worker_concurrency,
                controller_port=args.controller_port)
    return Stack(plan).run()


# ---- keys, usage, db ----------------------------------------------------------------------

def _add_access_commands(commands: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", default=None,
                        help="as for serve (default: FLASKCHAT_DATABASE_URL, else the SQLite "
                        "file in the data directory)")
    common.add_argument("--env-file", default=None, help="as for serve")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON")

    keys = commands.add_parser("keys", help="API keys: create, list, show, update, revoke")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", parents=[common, as_json],
                                help="make a key and print its secret (once)")
    create.add_argument("--name", required=True, type=_name)
    _add_limit_flags(create, clearable=False)
    create.set_defaults(run=_keys_create)
    listing = actions.add_parser("list", parents=[common, as_json], help="every key")
    listing.set_defaults(run=_keys_list)
    show = actions.add_parser("show", parents=[common, as_json], help="one key")
    show.add_argument("key", help="its id or name")
    show.set_defaults(run=_keys_show)
    update = actions.add_parser("update", parents=[common, as_json],
                                help="change a key's team, models, limits ('none' clears) "
                                "or share ('--default-tier auto' clears)")
    update.add_argument("key", help="its id or name")
    _add_limit_flags(update, clearable=True)
    update.set_defaults(run=_keys_update)
    revoke = actions.add_parser("revoke", parents=[common, as_json],
                                help="refuse a key from now on (everywhere within seconds)")
    revoke.add_argument("key", help="its id or name")
    revoke.set_defaults(run=_keys_revoke)

    usage = commands.add_parser("usage", parents=[common, as_json],
                                help="tokens and requests, grouped by key, team, model or day")
    usage.add_argument("--by", default="key", choices=("key", "team", "model", "day"))
    usage.add_argument("--since", default="7d", help="7d, 24h, 30m, 2w or an ISO date")
    usage.set_defaults(run=_usage)

    db = commands.add_parser("db", help="the key and usage database's schema")
    db_actions = db.add_subparsers(dest="action", required=True)
    upgrade = db_actions.add_parser("upgrade", parents=[common],
                                    help="create or migrate the schema (Alembic)")
    upgrade.set_defaults(run=_db_upgrade)
    check = db_actions.add_parser("check", parents=[common],
                                  help="exit 0 if the database is reachable and current")
    check.set_defaults(run=_db_check)


def _add_limit_flags(parser: argparse.ArgumentParser, clearable: bool) -> None:
    number = _clearable_positive if clearable else _positive_int
    parser.add_argument("--team", type=(lambda text: None if text == "none" else _name(text))
                        if clearable else _name, default=_UNSET)
    parser.add_argument("--models", type=_models, default=_UNSET,
                        help="comma-separated models the key may use (default: all; "
                        "'all' lets it use every model)")
    parser.add_argument("--rpm", type=number, default=_UNSET, help="requests per minute")
    parser.add_argument("--tpm", type=number, default=_UNSET, help="tokens per minute")
    parser.add_argument("--max-parallel", type=number, default=_UNSET,
                        help="requests at once")
    parser.add_argument("--budget", dest="budget_tokens", type=number, default=_UNSET,
                        help="tokens per --budget-period")
    parser.add_argument("--budget-period", choices=("day", "month", "none") if clearable
                        else ("day", "month"), default=_UNSET)
    parser.add_argument("--expires", type=_duration, default=None,
                        help="lifetime from now: 30d, 12h, 2w")
    # The ranges, and that the default tier is one the key may use, are the key store's
    # to check (app.access.keys), as for the admin API.
    parser.add_argument("--weight", type=float, default=_UNSET,
                        help="fair-share weight when the models are busy, above 0 and at "
                        "most 1000 (default 1); a team's is the highest of its active keys'")
    parser.add_argument("--max-tier", choices=TIERS, default=_UNSET,
                        help="the highest service tier the key may use (default: default)")
    parser.add_argument("--default-tier", choices=(*TIERS, AUTO_TIER), default=_UNSET,
                        help="the tier of a request that asks for none, at most --max-tier; "
                        f"'{AUTO_TIER}' (the default; on update: clears it) is flex for a key "
                        "whose max tier is flex, else default")


class _Unset:
    def __repr__(self) -> str:
        return "unset"


_UNSET: Any = _Unset()
_LIMIT_FIELDS = ("team", "models", "rpm", "tpm", "max_parallel", "budget_tokens",
                 "budget_period", "weight", "max_tier", "default_tier")


def _limit_values(args: argparse.Namespace) -> dict[str, Any]:
    values = {name: getattr(args, name) for name in _LIMIT_FIELDS
              if getattr(args, name) is not _UNSET}
    if values.get("budget_period") == "none":
        values["budget_period"] = None
    return values


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text!r}")
    return value


def _clearable_positive(text: str) -> int | None:
    return None if text == "none" else _positive_int(text)


def _models(text: str) -> list[str] | None:
    if text == "all":
        return None
    models = list(parse_list(text))
    if not models:
        raise argparse.ArgumentTypeError("name at least one model, or 'all'")
    return models


def _name(text: str) -> str:
    from schemas.admin import check_name

    try:
        return check_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> Any:
    from schemas.admin import lifetime

    try:
        return lifetime(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _settings(args: argparse.Namespace) -> Settings:
    """The server's settings as the environment (and --env-file) give them, with this
    command's --database-url."""
    return Settings.from_args(argparse.Namespace(database_url=args.database_url,
                                                 env_file=args.env_file))


def _database_url(args: argparse.Namespace) -> str:
    return _settings(args).database_url


def _keys_create(args: argparse.Namespace) -> int:
    from app.access import commands

    return commands.run(lambda: commands.create_key(
        _database_url(args), args.name, args.expires, args.json, **_limit_values(args)))


def _keys_list(args: argparse.Namespace) -> int:
    from app.access import commands

    return commands.run(lambda: commands.list_keys(_database_url(args), args.json))


def _keys_show(args: argparse.Namespace) -> int:
    from app.access import commands

    return commands.run(lambda: commands.show_key(_database_url(args), args.key, args.json))


def _keys_update(args: argparse.Namespace) -> int:
    from app.access import commands

    return commands.run(lambda: commands.update_key(
        _database_url(args), args.key, args.expires, args.json, **_limit_values(args)))


def _keys_revoke(args: argparse.Namespace) -> int:
    from app.access import commands

    return commands.run(lambda: commands.revoke_key(_database_url(args), args.key,
                                                    args.json))


def _usage(args: argparse.Namespace) -> int:
    from app.access import commands

    settings = _settings(args)
    return commands.run(lambda: commands.show_usage(settings.database_url, args.by,
                                                    args.since, args.json,
                                                    settings.usage_retention))


def _db_upgrade(args: argparse.Namespace) -> int:
    from app.access import commands

    return commands.run(lambda: commands.upgrade_db(_database_url(args)))


def _db_check(args: argparse.Namespace) -> int:
    from app.access import commands

    return commands.run(lambda: commands.check_db(_database_url(args)))


if __name__ == "__main__":
    sys.exit(main())

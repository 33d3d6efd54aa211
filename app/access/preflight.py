"""What ``flaskchat serve`` checks before it starts its processes, in a child process of
its own (``python -m app.access.preflight``): gunicorn's arbiter must not import the
database drivers (psycopg picks how it waits for sockets when it is imported, and must
see gevent's patches, which only the worker processes make).

The database must be reachable and at the newest schema (an SQLite file is brought
there); a bad URL or a database that cannot be used stops the server with a message.
Redis that cannot be reached is only a warning: limits are then not enforced until it is
(the gateway logs it), which is better than no gateway.
"""
from __future__ import annotations

import os
import sys

from app.access import database


def main() -> int:
    try:
        database.check(os.environ.get("FLASKCHAT_DATABASE_URL", ""))
    except database.DatabaseError as exc:
        print(f"flaskchat serve: {exc}", file=sys.stderr)
        return 2
    redis_url = os.environ.get("FLASKCHAT_REDIS_URL", "")
    if redis_url:
        import redis

        try:
            redis.Redis.from_url(redis_url, socket_connect_timeout=2.0,
                                 socket_timeout=2.0).ping()
        except ValueError as exc:
            print(f"flaskchat serve: --redis-url: {exc}", file=sys.stderr)
            return 2
        except redis.RedisError as exc:
            print(f"flaskchat serve: warning: Redis at --redis-url cannot be reached "
                  f"({exc}); rate limits are not enforced until it can", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

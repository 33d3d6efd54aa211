"""The database: its URL, an engine for it, and its schema's migrations.

SQLite by default (a file in the data directory: ``$XDG_DATA_HOME/flaskchat``, else
``~/.local/share/flaskchat``); PostgreSQL through psycopg 3 for several hosts. A plain
``postgresql://`` URL means psycopg 3 here (SQLAlchemy's own default is psycopg2).
"""
from __future__ import annotations

import fcntl
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from sqlalchemy import Engine, create_engine, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
REVISIONS = ("0001", "0002", "0003", "0004")  # this release's migrations, in order
HEAD = REVISIONS[-1]
MIGRATION_LOCK = 0x666C61736B  # any constant: the advisory lock's id
log = logging.getLogger("flaskchat.database")


class DatabaseError(Exception):
    """The database cannot be used: the message says why, for a person to act on."""


def default_url() -> str:
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return f"sqlite:///{os.path.join(data, 'flaskchat', 'flaskchat.db')}"


def normalized(url: str) -> str:
    """``url`` with psycopg 3 as the PostgreSQL driver unless one is named."""
    url = url or default_url()
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(f"not a database URL: {_shown(url)!r} (expected sqlite:///PATH "
                            "or postgresql://USER@HOST:PORT/NAME)") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise DatabaseError(f"unsupported database {parsed.get_backend_name()!r}: use "
                            "sqlite:/// or postgresql://")
    return parsed.render_as_string(hide_password=False)


def engine_for(url: str) -> Engine:
    url = normalized(url)
    if url.startswith("sqlite"):
        path = make_url(url).database
        if path and path != ":memory:":
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            except OSError as exc:
                raise DatabaseError(f"cannot make the directory of the SQLite database "
                                    f"{path!r}: {exc.strerror or exc}") from None
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    # Several gunicorn processes write usage to one file: WAL lets readers go on while one
    # writes, and a busy writer makes the others wait instead of failing.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def upgrade(url: str, to: str = "head") -> None:
    """Brings the schema to the newest revision (``flaskchat db upgrade``; ``to`` an older
    one: the schema a previous release left, for tests of its migration). Two processes
    that upgrade at once (two first starts) take turns: a lock file beside an SQLite file,
    an advisory lock in PostgreSQL."""
    from alembic import command

    url = normalized(url)
    engine = engine_for(url)
    try:
        with _sqlite_lock(url), engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:id)"),
                                   {"id": MIGRATION_LOCK})
            command.upgrade(_alembic_config(connection), to)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot upgrade {_shown(url)}: {reason(exc)}") from None
    except OSError as exc:
        raise DatabaseError(f"cannot use {_shown(url)}: {exc}") from None
    finally:
        engine.dispose()


@contextmanager
def _sqlite_lock(url: str) -> Iterator[None]:
    path = make_url(url).database if url.startswith("sqlite") else None
    if not path or path == ":memory:":
        yield
        return
    with open(os.path.abspath(path) + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def revision(url: str) -> str | None:
    """The schema revision the database is at (None: not set up yet)."""
    from alembic.runtime.migration import MigrationContext

    engine = engine_for(url)
    try:
        with engine.connect() as connection:
            current: str | None = MigrationContext.configure(connection).get_current_revision()
            return current
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot reach the database {_shown(url)}: {reason(exc)}") \
            from None
    finally:
        engine.dispose()


def check(url: str, upgrade_sqlite: bool = True) -> None:
    """Ready to serve: reachable, and at this release's revision (an SQLite file is
    brought there; PostgreSQL, shared by several hosts, is upgraded on purpose, by a
    person). A revision newer than this release's is fine when that revision says this
    release can still run on it (an additive migration: a rolling deploy's hosts still on
    the previous release, or a rollback), and refused otherwise."""
    url = normalized(url)
    current = revision(url)
    if current == HEAD:
        return
    if current is not None and current not in REVISIONS:
        oldest = oldest_release(url, current)
        if oldest is not None and oldest in REVISIONS:
            log.warning("the database %s is at schema revision %s, newer than this "
                        "release's %s, which can still run on it (upgrade this host soon)",
                        _shown(url), current, HEAD)
            return
        raise DatabaseError(f"the database {_shown(url)} is at schema revision {current}, "
                            f"newer than this release's {HEAD}, and this release cannot run "
                            "on it: run a newer flaskchat")
    if url.startswith("sqlite") and upgrade_sqlite:
        upgrade(url)
        return
    raise DatabaseError(f"the database {_shown(url)} is at schema revision "
                        f"{current or 'none'}, not {HEAD}: run `flaskchat db upgrade "
                        "--database-url ...` first")


def oldest_release(url: str, at_revision: str) -> str | None:
    """The oldest schema revision whose release can run on ``at_revision``, as that
    revision's migration wrote it (None: it says nothing, so none can)."""
    from app.access.tables import schema_releases

    engine = engine_for(url)
    try:
        with engine.connect() as connection:
            found: str | None = connection.execute(
                select(schema_releases.c.oldest_release)
                .where(schema_releases.c.revision == at_revision)).scalar()
            return found
    except SQLAlchemyError:
        return None  # no such table: a schema from before revision 0003
    finally:
        engine.dispose()


def answers(engine: Engine) -> bool:
    """Whether the database answers now: a write it refused was then about its rows, not
    about the database being away."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except Exception:  # unreachable, whatever the driver says
        return False


STOP_RETRY = 10.0  # seconds a graceful stop keeps trying to write what is left


def write_before_stopping(flush: Callable[[], bool], left: Callable[[], int], what: str,
                          timeout: float = STOP_RETRY) -> bool:
    """On a graceful stop: ``flush`` (which says whether it could write) is retried for up
    to ``timeout`` seconds while the database refuses; what is still ``left`` then is
    logged as lost."""
    deadline = time.monotonic() + timeout
    while not flush():
        if time.monotonic() > deadline:
            log.error("stopping with %d %s unwritten", left(), what)
            return False
        time.sleep(0.2)
    return True


def _alembic_config(connection: Any) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def shown_url(url: str) -> str:
    """The URL (the default one if empty) without its password, for messages and logs."""
    return _shown(normalized(url)) if _parses(url) else _shown(url)


def _parses(url: str) -> bool:
    try:
        normalized(url)
    except DatabaseError:
        return False
    return True


def _shown(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(an unreadable URL)"


def reason(exc: BaseException) -> str:
    """A database failure in one short line: the driver's own message where there is one."""
    return " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]

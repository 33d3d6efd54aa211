"""The directory a gateway's worker processes share: Prometheus' multiprocess value files
and the demo page's stream tickets.

gunicorn's arbiter prepares it before it forks, and the workers inherit its place through
the environment, so that /metrics sums every worker and a ticket made by one worker can be
redeemed by another. It is private (mode 0700) and, when the arbiter made it, removed when
the arbiter exits.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when it is imported
STATE_ENV = "FLASKCHAT_STATE_DIR"
_PREPARED_BY = "FLASKCHAT_STATE_DIR_PREPARED_BY"


def prepare(state_dir: str = "") -> str:
    """In the arbiter, before any worker starts: makes the directory, clears metric values
    an earlier run left there, and exports both places to the workers. Again in the same
    process (gunicorn re-reads its config on HUP) it changes nothing: the running
    workers' values must stay."""
    if os.environ.get(_PREPARED_BY) == str(os.getpid()) and os.environ.get(STATE_ENV):
        return os.environ[STATE_ENV]
    path = state_dir or tempfile.mkdtemp(prefix="flaskchat-")
    os.makedirs(path, mode=0o700, exist_ok=True)
    metrics = os.environ.get(METRICS_ENV) or os.path.join(path, "metrics")
    os.makedirs(metrics, exist_ok=True)
    for name in os.listdir(metrics):
        if name.endswith(".db"):
            os.remove(os.path.join(metrics, name))
    os.makedirs(tickets_dir(path), mode=0o700, exist_ok=True)
    os.environ[STATE_ENV] = path
    os.environ[METRICS_ENV] = metrics
    os.environ[_PREPARED_BY] = str(os.getpid())
    if not state_dir:
        atexit.register(_remove_if_owner, path, os.getpid())
    return path


def tickets_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "demo-tickets")


def private_dir() -> str:
    """For an app made outside gunicorn's arbiter (tests, ``flask run``): one process, so
    only the tickets need a place."""
    path = tempfile.mkdtemp(prefix="flaskchat-")
    os.makedirs(tickets_dir(path), mode=0o700)
    atexit.register(_remove_if_owner, path, os.getpid())
    return path


def worker_exited(pid: int) -> None:
    """gunicorn's child_exit hook: the dead worker's gauges stop counting."""
    if os.environ.get(METRICS_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def _remove_if_owner(path: str, owner: int) -> None:
    # Forked workers inherit atexit handlers; only the process that made the directory
    # removes it.
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)

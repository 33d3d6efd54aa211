"""gunicorn settings for the gateway: ``gunicorn -c gunicorn.conf.py wsgi:app``.

Everything else comes from FLASKCHAT_* environment variables (see README). Imports nothing
from app/, so that requests is first imported after the gevent worker has patched.
"""
import os

bind = [f"{os.environ.get('FLASKCHAT_HOST', 'localhost')}:"
        f"{os.environ.get('FLASKCHAT_PORT', '8000')}"]
workers = int(os.environ.get("FLASKCHAT_WORKERS", "1"))
# gunicorn's gevent worker; a graceful stop also closes idle keep-alive connections at once.
worker_class = "app.runtime.gevent_worker.GeventWorker"
# Each open stream holds one connection; the default of 1,000 caps a process too low.
worker_connections = int(os.environ.get("FLASKCHAT_WORKER_CONNECTIONS", "10000"))
# For gevent workers this only catches a hub blocked this long; streams are bounded by
# the upstream read timeout instead, so it must not be 0 nor stream-length.
timeout = 60
# How long a deploy (SIGTERM/HUP) lets running streams finish.
graceful_timeout = int(os.environ.get("FLASKCHAT_GRACEFUL_TIMEOUT", "120"))
keepalive = 75
preload_app = False
control_socket_disable = True

# The directory the workers share (metric files, demo tickets), made before they fork.
from app.runtime import state_dir  # noqa: E402  (imports nothing that gevent must patch first)

state_dir.prepare(os.environ.get("FLASKCHAT_STATE_DIR", ""))


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    state_dir.worker_exited(worker.pid)

"""gunicorn settings for the gateway: ``gunicorn -c gunicorn.conf.py wsgi:app``.

The same settings ``flaskchat serve`` uses (``app.runtime.gunicorn_runner``), from the
FLASKCHAT_* environment variables and FLASKCHAT_ENV_FILE (see README). The arbiter runs
this file at start and again on every reload (SIGHUP), which re-reads the env file, the API
keys file and the upstreams file. What it imports loads no requests, so the gevent
workers patch before that is imported.
"""
from app.config import Settings
from app.runtime.gunicorn_runner import gateway_config, gateway_settings

globals().update(gateway_config(gateway_settings(Settings.from_env)))

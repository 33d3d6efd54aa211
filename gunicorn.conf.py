"""gunicorn settings for the gateway: ``gunicorn -c gunicorn.conf.py wsgi:app``.

The same settings ``flaskchat serve`` uses (``app.runtime.gunicorn_runner``), from the
FLASKCHAT_* environment variables (see README). The arbiter executes this file before it
forks: what it imports loads no requests, so the gevent workers patch before that is
imported.
"""
from app.config import Settings
from app.runtime import state_dir
from app.runtime.gunicorn_runner import gateway_config

_settings = Settings.from_env()
# The directory the workers share (metric files, demo tickets), made before they fork.
state_dir.prepare(_settings.state_dir)
globals().update(gateway_config(_settings))

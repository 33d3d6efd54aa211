"""gunicorn target: ``gunicorn -c gunicorn.conf.py wsgi:app`` (settings from FLASKCHAT_*,
as the arbiter accepted them at start or at the last reload)."""
from app import create_app
from app.runtime.gunicorn_runner import accepted_gateway_settings

app = create_app(*accepted_gateway_settings())

"""gunicorn target: ``gunicorn -c gunicorn.conf.py wsgi:app`` (settings from FLASKCHAT_*)."""
from app import create_app

app = create_app()

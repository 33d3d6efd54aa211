"""Alembic migrations of the access tables (run by ``flaskchat db upgrade``)."""

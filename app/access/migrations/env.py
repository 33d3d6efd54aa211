"""Alembic's environment: always run with a connection handed in by
``app.access.database`` (no alembic.ini, no engine of its own)."""
from alembic import context

from app.access.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()

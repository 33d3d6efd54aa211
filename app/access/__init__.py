"""API keys, rate limits, budgets and the usage ledger, kept in a database.

SQLite by default, PostgreSQL for several hosts (SQLAlchemy Core, Alembic migrations);
rate-limit counters in process memory, or in Redis when several processes share them.
"""

"""Usage per day gets errors, latency and the key's name (reports beyond the retention
window); stored responses get their size and an (owner, created_at) index (per-key
quotas); the table that says which releases can run on each revision. Additive: a
release at 0002 can run on it.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None
# The oldest schema revision whose release can run on this one (app.access.database).
oldest_release = "0002"


def upgrade() -> None:
    with op.batch_alter_table("usage_daily") as table:
        table.add_column(sa.Column("errors", sa.BigInteger, nullable=False,
                                   server_default="0"))
        table.add_column(sa.Column("latency_ms", sa.Float, nullable=False,
                                   server_default="0"))
        table.add_column(sa.Column("key_name", sa.String(200)))
    with op.batch_alter_table("responses") as table:
        table.add_column(sa.Column("bytes", sa.BigInteger, nullable=False,
                                   server_default="0"))
    op.execute("UPDATE responses SET bytes = LENGTH(input_items) + LENGTH(context) "
               "+ LENGTH(response)")
    op.create_index("ix_responses_owner_created", "responses", ["owner", "created_at"])
    schema = op.create_table(
        "flaskchat_schema",
        sa.Column("revision", sa.String(32), primary_key=True),
        sa.Column("oldest_release", sa.String(32), nullable=False),
    )
    op.bulk_insert(schema, [{"revision": revision, "oldest_release": oldest_release}])


def downgrade() -> None:
    op.drop_table("flaskchat_schema")
    op.drop_index("ix_responses_owner_created", "responses")
    with op.batch_alter_table("responses") as table:
        table.drop_column("bytes")
    with op.batch_alter_table("usage_daily") as table:
        table.drop_column("key_name")
        table.drop_column("latency_ms")
        table.drop_column("errors")

"""API keys get a fair-share weight and service tiers (the highest they may use, and the
one a request gets when it asks for none). Additive: a release at 0003 can run on it, and
the keys it makes read as weight 1, highest tier ``default``, default tier unset.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None
# The oldest schema revision whose release can run on this one (app.access.database).
oldest_release = "0003"


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as table:
        table.add_column(sa.Column("weight", sa.Float, nullable=False, server_default="1"))
        table.add_column(sa.Column("max_tier", sa.String(16), nullable=False,
                                   server_default="default"))
        table.add_column(sa.Column("default_tier", sa.String(16)))
    schema = sa.table("flaskchat_schema", sa.column("revision", sa.String),
                      sa.column("oldest_release", sa.String))
    op.bulk_insert(schema, [{"revision": revision, "oldest_release": oldest_release}])


def downgrade() -> None:
    op.execute("DELETE FROM flaskchat_schema WHERE revision = '0004'")
    with op.batch_alter_table("api_keys") as table:
        table.drop_column("default_tier")
        table.drop_column("max_tier")
        table.drop_column("weight")

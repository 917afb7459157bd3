"""The single-reader schema (version 1, as napari-mammo-sae wrote it before Alembic).

Files from that time are stamped with this revision when first opened, then upgraded.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("schema_version", sa.Column("version", sa.Integer, nullable=False))
    op.create_table(
        "verdicts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("sae_hash", sa.Text, nullable=False),
        sa.Column("neuron", sa.Integer, nullable=False),
        sa.Column("image_uid", sa.Text, nullable=False, server_default=""),
        sa.Column("concept", sa.Text, nullable=False, server_default=""),
        sa.Column("verdict", sa.Text, nullable=False),
        sa.Column("rater", sa.Text, nullable=False),
        sa.Column("note", sa.Text, nullable=False, server_default=""),
        sa.Column("created_utc", sa.Text, nullable=False),
        sa.CheckConstraint("verdict IN ('clinical', 'spurious', 'unsure')", name="verdict_known"),
        sa.UniqueConstraint(
            "sae_hash", "neuron", "image_uid", "rater", "created_utc", "verdict", "note",
            name="verdict_once",
        ),
    )  # fmt: skip
    op.create_index("verdicts_by_neuron", "verdicts", ["sae_hash", "neuron"])
    op.execute("INSERT INTO schema_version (version) VALUES (1)")

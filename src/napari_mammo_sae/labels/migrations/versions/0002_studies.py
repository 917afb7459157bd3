"""Idempotency keys, reading studies.

Every verdict gets a ``uid`` (old rows: derived from their content) and the study it belongs to
('' outside a study); the study tables hold the design (SAE, concept, seed, neurons, readers).
``schema_version`` goes to 2 so an older plugin refuses the file instead of writing keyless rows.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from napari_mammo_sae.labels.schema import CONTENT_FIELDS, content_uid

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("verdicts", sa.Column("uid", sa.Text, nullable=True))
    op.add_column("verdicts", sa.Column("study", sa.Text, nullable=False, server_default=""))
    conn = op.get_bind()
    v = sa.table("verdicts", sa.column("id"), sa.column("uid"), *map(sa.column, CONTENT_FIELDS))
    rows = conn.execute(sa.select(v).where(v.c.uid.is_(None))).mappings().all()
    for r in rows:
        conn.execute(sa.update(v).where(v.c.id == r["id"]).values(uid=content_uid(dict(r))))
    op.create_index("verdicts_uid", "verdicts", ["uid"], unique=True)
    op.create_index("verdicts_by_study", "verdicts", ["study", "rater"])
    op.create_table(
        "studies",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("sae_hash", sa.Text, nullable=False),
        sa.Column("concept", sa.Text, nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("created_utc", sa.Text, nullable=False),
        sa.Column("coordinator", sa.Text, nullable=False),
        sa.Column("design", sa.Text, nullable=False, server_default=""),
    )
    op.create_table(
        "study_readers",
        sa.Column("study", sa.Text, sa.ForeignKey("studies.id"), primary_key=True),
        sa.Column("reader", sa.Text, primary_key=True),
    )
    op.create_table(
        "study_neurons",
        sa.Column("study", sa.Text, sa.ForeignKey("studies.id"), primary_key=True),
        sa.Column("neuron", sa.Integer, primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
    )
    op.execute("DELETE FROM schema_version")
    op.execute("INSERT INTO schema_version (version) VALUES (2)")

"""The tables, as SQLAlchemy Core objects (the migrations in ``migrations/`` create them).

``verdicts`` is append-only: a changed mind is a new row, and "the" verdict of a rater is their row
with the highest ``id`` (insertion order, never the wall clock). ``uid`` is the verdict's
idempotency key, made by the client before the first attempt to send it, so a verdict sent twice
(a retry after a dropped connection, a flushed outbox) is stored once.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

verdicts = sa.Table(
    "verdicts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sae_hash", sa.Text, nullable=False),
    sa.Column("neuron", sa.Integer, nullable=False),
    sa.Column("image_uid", sa.Text, nullable=False, server_default=""),
    sa.Column("concept", sa.Text, nullable=False, server_default=""),
    sa.Column("verdict", sa.Text, nullable=False),
    sa.Column("rater", sa.Text, nullable=False),
    sa.Column("note", sa.Text, nullable=False, server_default=""),
    sa.Column("created_utc", sa.Text, nullable=False),
    sa.Column("uid", sa.Text, unique=True),
    sa.Column("study", sa.Text, nullable=False, server_default=""),
)

studies = sa.Table(
    "studies",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("sae_hash", sa.Text, nullable=False),
    sa.Column("concept", sa.Text, nullable=False),
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("created_utc", sa.Text, nullable=False),
    sa.Column("coordinator", sa.Text, nullable=False),
    sa.Column(
        "design", sa.Text, nullable=False, server_default=""
    ),  # JSON: how neurons were chosen
)

study_readers = sa.Table(
    "study_readers",
    metadata,
    sa.Column("study", sa.Text, sa.ForeignKey("studies.id"), primary_key=True),
    sa.Column("reader", sa.Text, primary_key=True),
)

study_neurons = sa.Table(
    "study_neurons",
    metadata,
    sa.Column("study", sa.Text, sa.ForeignKey("studies.id"), primary_key=True),
    sa.Column("neuron", sa.Integer, primary_key=True),
    sa.Column(
        "source", sa.Text, nullable=False
    ),  # "top class 1", "top class 0", "control", "given"
)


CONTENT_FIELDS = (
    "sae_hash",
    "neuron",
    "image_uid",
    "concept",
    "verdict",
    "rater",
    "note",
    "created_utc",
)


def content_uid(row) -> str:
    """The idempotency key of a verdict that never had one (old files, old CSV exports).

    Derived from the row's content, so the same old verdict gets the same key in every copy.
    """
    import uuid

    text = "\x1f".join(
        str(row[f] if isinstance(row, dict) else getattr(row, f)) for f in CONTENT_FIELDS
    )
    return "v1-" + str(uuid.uuid5(uuid.NAMESPACE_OID, text))

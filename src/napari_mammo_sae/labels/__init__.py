"""Clinicians' verdicts on SAE neurons, and multi-reader reading studies.

- :mod:`.store` - :class:`LabelStore`, the append-only verdict store (SQLite file by default, or a
  PostgreSQL server for a study), with history, CSV export/import and simple agreement;
- :mod:`.db` / :mod:`.migrate` - where the database is, passwords, typed errors, Alembic versions;
- :mod:`.study` - a reading study: design, per-reader blinded queues, agreement report, export;
- :mod:`.outbox` - a local queue that keeps a reader's verdicts while the server is away;
- :mod:`.agreement` - Cohen's and Fleiss' kappa, Krippendorff's alpha, bootstrap CIs, consensus.
"""

from __future__ import annotations

from .agreement import cohen_kappa, fleiss_kappa
from .db import default_path
from .store import CSV_FIELDS, VERDICTS, LabelStore, Verdict

__all__ = [
    "CSV_FIELDS",
    "VERDICTS",
    "LabelStore",
    "Verdict",
    "cohen_kappa",
    "default_path",
    "fleiss_kappa",
]

"""Schema versions: bring a database to the newest Alembic revision, once, under a lock.

SQLite: the upgrade runs inside ``BEGIN IMMEDIATE`` (one writer at a time), so two processes that
open a new or old file at the same moment cannot both create tables or insert the schema version;
the second finds the work done. PostgreSQL: the same under ``pg_advisory_xact_lock`` (DDL is
transactional there too). A file written before Alembic (a ``schema_version`` table saying 1, no
``alembic_version``) is stamped as revision 0001 and upgraded in place: every verdict is kept.
"""

from __future__ import annotations

import threading
from pathlib import Path

import sqlalchemy as sa

from ..errors import LabelDatabaseError
from .db import MIGRATION_LOCK, Target, describe

MIGRATIONS = Path(__file__).parent / "migrations"
#: the newest revision in ``migrations/versions`` (a test checks it against Alembic's head); kept
#: here so a reader whose database is up to date never has to import Alembic
HEAD = "0003"
# Alembic's ``context`` is process-global: one migration at a time per process (the database lock
# below keeps other processes out)
_IN_PROCESS = threading.Lock()


def _config(conn: sa.Connection | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


def head() -> str:
    """The newest schema revision this version of the plugin writes (from Alembic's scripts)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config()).get_current_head()


def current(conn: sa.Connection) -> str | None:
    """The revision a database is at (None: not versioned by Alembic)."""
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()


def _known(rev: str) -> bool:
    from alembic.script import ScriptDirectory

    try:
        return ScriptDirectory.from_config(_config()).get_revision(rev) is not None
    except Exception:  # noqa: BLE001 - alembic.util.CommandError for unknown ids
        return False


def upgrade(engine: sa.Engine, target: Target) -> str:
    """Bring the database to :func:`head` (no-op when there); returns the revision."""
    want = HEAD
    try:
        with engine.connect() as conn:
            rev = current(conn)
            conn.rollback()
        if rev == want:
            return rev
        if rev is not None and not _known(rev):
            raise LabelDatabaseError(
                f"{target.display} was written by a newer napari-mammo-sae (schema {rev}): update "
                "the plugin to use it"
            )
        with _IN_PROCESS, engine.connect().execution_options(mammo_immediate=True) as conn:
            with conn.begin():
                if engine.dialect.name == "postgresql":
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))
                rev = current(conn)  # again, under the lock: another process may have done it
                if rev is None:
                    names = set(sa.inspect(conn).get_table_names())
                    if "verdicts" in names:  # a single-reader file from before Alembic
                        old = conn.exec_driver_sql("SELECT max(version) FROM schema_version")
                        version = old.scalar() if "schema_version" in names else 1
                        if version not in (None, 1):
                            raise LabelDatabaseError(
                                f"{target.display} has an unknown schema version {version}: "
                                "update the plugin to use it"
                            )
                        from alembic import command

                        command.stamp(_config(conn), "0001")
                if rev != want:
                    from alembic import command

                    command.upgrade(_config(conn), "head")
        return want
    except LabelDatabaseError:
        raise
    except sa.exc.DBAPIError as exc:
        err = describe(exc, target)
        if target.is_server and "permission" in str(err).lower():
            raise type(err)(
                f"the database {target.display} needs its schema created or upgraded to {want}, "
                f"which user {target.user!r} may not do: ask the study coordinator to run "
                "'napari-mammo-sae study init'"
            ) from exc
        raise err from exc

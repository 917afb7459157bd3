"""A reader's local outbox: verdicts wait here (an SQLite file) until the server has them.

A verdict the server cannot take now is written here (committed, synced) and the reader sees
"queued"; it leaves the outbox only after the server committed it. If the server is away (restarted, network dropped) the
verdicts stay, in order, and :meth:`Outbox.flush` sends them when it is back - oldest first,
stopping at the first failure so the order holds. Each carries its idempotency key, so a verdict
whose send succeeded but whose removal from the outbox did not (a kill in between) is stored once.
A verdict the server refuses for good (e.g. the reader was removed from the study) moves to a
``refused`` table with the reason: kept, never silently dropped.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import LabelDatabaseError, PermissionRefusedError, StoreError
from .store import now_utc

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    target TEXT NOT NULL,
    uid TEXT NOT NULL UNIQUE,
    row TEXT NOT NULL,
    queued_utc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS refused (
    seq INTEGER PRIMARY KEY,
    target TEXT NOT NULL,
    uid TEXT NOT NULL,
    row TEXT NOT NULL,
    reason TEXT NOT NULL,
    refused_utc TEXT NOT NULL
);
"""


def _locked(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


def default_outbox_path() -> Path:
    """outbox.sqlite in the user data directory."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("napari-mammo-sae", appauthor=False)) / "outbox.sqlite"


@dataclass
class FlushResult:
    """What one flush did: rows sent, rows still waiting, rows refused, and why it stopped."""

    sent: list[str]  # uids, in order
    left: int
    refused: int = 0
    error: str = ""


class Outbox:
    """The local queue (one file per workstation; rows are tagged with their server)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_outbox_path()
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # one connection, used by whichever worker thread runs the (serialised) operation
            self._db = sqlite3.connect(
                str(self.path), timeout=10.0, isolation_level=None, check_same_thread=False
            )
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":  # still durable (synchronous=FULL), only slower
                self._db.execute("PRAGMA journal_mode=DELETE")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.DatabaseError, OSError) as exc:
            raise LabelDatabaseError(
                f"cannot open the local outbox {self.path}: {exc}. Choose a writable folder"
            ) from exc

    def close(self) -> None:
        self._db.close()

    @_locked
    def put(self, target: str, row: dict) -> str:
        """Queue one verdict row (it must carry ``uid`` and ``created_utc``); committed on return."""
        try:
            self._db.execute(
                "INSERT OR IGNORE INTO pending (target, uid, row, queued_utc) VALUES (?, ?, ?, ?)",
                (target, row["uid"], json.dumps(row), now_utc()),
            )
        except sqlite3.DatabaseError as exc:
            raise LabelDatabaseError(f"the verdict was NOT saved (local outbox: {exc})") from exc
        return row["uid"]

    @_locked
    def pending(self, target: str | None = None) -> list[dict]:
        """Waiting rows, oldest first."""
        sql, args = "SELECT row FROM pending", ()
        if target is not None:
            sql, args = sql + " WHERE target = ?", (target,)
        return [json.loads(r) for (r,) in self._db.execute(sql + " ORDER BY seq", args)]

    @_locked
    def refused(self, target: str | None = None) -> list[tuple[dict, str]]:
        """Rows the server refused for good, with the reason."""
        sql, args = "SELECT row, reason FROM refused", ()
        if target is not None:
            sql, args = sql + " WHERE target = ?", (target,)
        return [(json.loads(r), why) for r, why in self._db.execute(sql + " ORDER BY seq", args)]

    @_locked
    def _remove(self, uid: str) -> None:
        # no sync needed: a removal lost to a power cut only means the verdict is sent again,
        # and the server stores it once (idempotency key)
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._db.execute("DELETE FROM pending WHERE uid = ?", (uid,))
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    @_locked
    def _refuse(self, target: str, row: dict, reason: str) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                "INSERT INTO refused (seq, target, uid, row, reason, refused_utc) "
                "SELECT seq, target, uid, row, ?, ? FROM pending WHERE uid = ?",
                (reason, now_utc(), row["uid"]),
            )
            self._db.execute("DELETE FROM pending WHERE uid = ?", (row["uid"],))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")  # the row stays pending: nothing lost
            raise

    def flush(self, store, target: str | None = None) -> FlushResult:
        """Send waiting rows to ``store`` (a LabelStore), oldest first; stop at the first outage."""
        target = target or store.key
        sent: list[str] = []
        refused = 0
        rows = self.pending(target)
        for i, row in enumerate(rows):
            try:
                store.add(**row)
            except PermissionRefusedError as exc:
                # refused for good (not this reader's name, not in the study): kept, set aside
                self._refuse(target, row, str(exc))
                refused += 1
                continue
            except LabelDatabaseError as exc:  # server away, login failed...: try again later
                return FlushResult(sent, len(rows) - i, refused, str(exc))
            except StoreError as exc:  # a row the store can never take (bad verdict...): set aside
                self._refuse(target, row, str(exc))
                refused += 1
                continue
            self._remove(row["uid"])
            sent.append(row["uid"])
        return FlushResult(sent, 0, refused)

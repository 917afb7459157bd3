"""Where verdicts live: an SQLite file (default) or a PostgreSQL server, behind one SQLAlchemy engine.

``open_engine(target)`` takes a file path, an ``sqlite:///`` URL or a ``postgresql://user@host/db``
URL and returns a ready engine with the schema migrated (Alembic, under a lock so two processes
opening a new file at once cannot both create it). Passwords never travel in URLs, settings or
messages: the server's password comes from ``NAPARI_MAMMO_SAE_DB_PASSWORD``, libpq's own
``PGPASSWORD`` or ``~/.pgpass`` (``PGPASSFILE``), or a ``prompt`` callback (the dock's password
box, ``getpass`` on the shell). Errors are typed (``errors.LabelDatabaseError`` and subclasses) and
name the server and user, never the password.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url

from ..errors import (
    DatabaseAuthError,
    DatabaseUnavailableError,
    LabelDatabaseError,
    PermissionRefusedError,
)

log = logging.getLogger(__name__)

PASSWORD_ENV = "NAPARI_MAMMO_SAE_DB_PASSWORD"
#: environment variable holding the database URL for the shell commands (no password in it)
URL_ENV = "NAPARI_MAMMO_SAE_DB"
CONNECT_TIMEOUT_S = 3
MIGRATION_LOCK = 0x6D616D6D  # pg_advisory_xact_lock key ("mamm")


def default_path() -> Path:
    """labels.sqlite in the user data directory (platformdirs)."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("napari-mammo-sae", appauthor=False)) / "labels.sqlite"


@dataclass(frozen=True)
class Target:
    """A parsed database location: the SQLAlchemy URL (never with a password) and a display name."""

    url: URL
    display: str  # what messages say: a file name, or user@host:port/db

    @property
    def is_server(self) -> bool:
        return self.url.get_backend_name() == "postgresql"

    @property
    def user(self) -> str:
        return self.url.username or os.environ.get("PGUSER") or _os_user()

    @property
    def path(self) -> Path | None:
        return Path(self.url.database) if not self.is_server and self.url.database else None


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return ""


def is_server_url(text: str | os.PathLike | None) -> bool:
    """True for ``postgresql://`` (or ``postgres://``) URLs."""
    return (
        isinstance(text, str) and re.match(r"^postgres(ql)?(\+\w+)?://", text.strip()) is not None
    )


def parse_target(target: str | os.PathLike | None) -> Target:
    """A file path or URL -> :class:`Target`; refuses a URL that carries a password."""
    if target is None or (isinstance(target, str) and not target.strip()):
        target = default_path()
    if isinstance(target, os.PathLike) or not re.match(r"^[a-z][a-z0-9+]*://", str(target)):
        path = Path(target).expanduser()
        return Target(URL.create("sqlite", database=str(path)), path.name)
    text = str(target).strip()
    try:
        url = make_url(text)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy.exc.ArgumentError and friends
        raise LabelDatabaseError(
            "the database address is not a valid URL: use postgresql://USER@HOST:PORT/DATABASE "
            "or a file path"
        ) from exc
    backend = url.get_backend_name()
    if url.password is not None:
        # never echo it: it may already be in a shell history, but not in our messages or logs
        raise LabelDatabaseError(
            "the database URL contains a password: remove it from the URL and give it through "
            f"{PASSWORD_ENV} or PGPASSWORD, a ~/.pgpass file, or the password prompt"
        )
    if backend == "sqlite":
        path = Path(url.database or default_path()).expanduser()
        return Target(URL.create("sqlite", database=str(path)), path.name)
    if backend in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
        if not url.database:
            raise LabelDatabaseError("the database URL names no database: .../DATABASE")
        where = f"{url.username + '@' if url.username else ''}{url.host or 'localhost'}"
        where += f":{url.port}" if url.port else ""
        return Target(url, f"{where}/{url.database}")
    raise LabelDatabaseError(
        f"unsupported database type {backend!r}: use a file path (SQLite) or postgresql://..."
    )


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _sqlite_begin)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=10000")
    mode = check_wal(dbapi_conn)
    if mode != "wal":
        log.warning(
            "the label database could not switch to WAL mode (journal mode %r, e.g. on a network "
            "share): verdicts are still synced before 'saved', but viewers wait for each other",
            mode,
        )
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def check_wal(dbapi_conn, wait_s: float = 10.0) -> str:
    """Ask SQLite for WAL mode and return the journal mode it actually set ('wal' on success).

    Switching a new file to WAL needs a moment alone with it, and SQLite can answer "database is
    locked" at once, without its busy handler, while another connection converts or reads it
    (several viewers opening a new database together): retried for up to ``wait_s`` seconds.
    """
    import sqlite3
    import time

    deadline = time.monotonic() + wait_s
    while True:
        cur = dbapi_conn.cursor()
        try:
            row = cur.execute("PRAGMA journal_mode=WAL").fetchone()
            return str(row[0]).lower() if row else ""
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc).lower() or time.monotonic() > deadline:
                raise
        finally:
            cur.close()
        time.sleep(0.05)


def _sqlite_begin(conn) -> None:
    immediate = conn.get_execution_options().get("mammo_immediate", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(target: Target, password: str | None = None) -> Engine:
    """An engine for ``target`` (no connection made yet)."""
    if not target.is_server:
        path = target.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LabelDatabaseError(
                f"cannot create the label database at {path}: {exc}. Choose a writable folder"
            ) from exc
        # pooled (SQLAlchemy's default for files): closing the last connection to a WAL file
        # checkpoints it, which per verdict would cost more than the verdict's own synced commit
        engine = sa.create_engine(target.url, connect_args={"timeout": 10.0})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    password = password or os.environ.get(PASSWORD_ENV) or None
    args: dict = {"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "napari-mammo-sae"}
    if password:
        args["password"] = password  # in connect_args, never in the URL (URLs get printed)
    return sa.create_engine(
        target.url,
        connect_args=args,
        pool_size=2,  # a viewer's few threads; connections are kept (logins cost a round trip)
        max_overflow=4,
        pool_pre_ping=True,  # a connection the server dropped (restart) is replaced, not used
        hide_parameters=True,
    )


def describe(exc: BaseException, target: Target, secret: str | None = None) -> LabelDatabaseError:
    """A database exception -> a typed error that says what to do (never containing a password)."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    low = str(orig).lower()
    where = target.display
    if secret:
        text = text.replace(secret, "***")
    if not target.is_server:
        if "locked" in low or "busy" in low:
            return LabelDatabaseError(
                f"{where} is locked by another program ({text}); close it and try again"
            )
        if "readonly" in low or "read-only" in low:
            return LabelDatabaseError(
                f"{target.path} is read-only ({text}): choose a label database in a writable folder"
            )
        if "malformed" in low or "not a database" in low:
            return LabelDatabaseError(
                f"{target.path} is damaged ({text}): choose another file; this one is left untouched"
            )
        if "unable to open" in low:
            return LabelDatabaseError(
                f"cannot open the label database at {target.path} ({text}): choose a writable folder"
            )
        return LabelDatabaseError(f"{text} (database {target.path})")
    user = target.user
    # the server's SQLSTATE when there is one (errors inside a session); libpq's connection
    # failures carry none, so their message text decides below
    state = str(getattr(orig, "sqlstate", "") or "")
    if state == "42501":  # insufficient_privilege (also: a row-level security policy refused)
        return PermissionRefusedError(f"the database refused: {text} (user {user!r} on {where})")
    if state.startswith("08") or state in ("57P01", "57P02", "57P03"):  # connection, shutdown
        return DatabaseUnavailableError(
            f"cannot reach the database server {where} ({text}); try again when it is back"
        )
    if "password authentication failed" in low or state == "28P01":
        return DatabaseAuthError(
            f"wrong password for database user {user!r} on {where}: check it (set "
            f"{PASSWORD_ENV} or PGPASSWORD, fix ~/.pgpass, or type it again)"
        )
    if "no password supplied" in low or "fe_sendauth" in low:
        return DatabaseAuthError(
            f"{where} asks user {user!r} for a password: set {PASSWORD_ENV} or PGPASSWORD, add it "
            "to ~/.pgpass, or enter it when asked"
        )
    if "does not exist" in low and ("database" in low or "role" in low):
        return LabelDatabaseError(f"{where}: {text}. Check the URL or ask the study coordinator")
    if "permission denied" in low or "row-level security" in low or "insufficient" in low:
        return PermissionRefusedError(f"the database refused: {text} (user {user!r} on {where})")
    if (
        "connection" in low
        or "timeout" in low
        or "timed out" in low
        or "server closed" in low
        or "terminating" in low
        or "shutting down" in low
        or "starting up" in low
        or "could not receive" in low
        or "consuming input failed" in low
        or isinstance(exc, sa.exc.DBAPIError)
        and exc.connection_invalidated
    ):
        return DatabaseUnavailableError(
            f"cannot reach the database server {where} ({text}); try again when it is back"
        )
    return LabelDatabaseError(f"{text} (database {where})")


PasswordPrompt = Callable[[str], "str | None"]

# Passwords that logged in during this process (typed at a prompt), by server/user/database, so
# the other docks of the same viewer reach the study's database too. Memory only, never written.
_LOGGED_IN: dict[tuple, str] = {}


def _login_key(target: Target) -> tuple:
    u = target.url
    return (u.host, u.port, u.database, target.user)


def connect_checked(
    target: Target, password: str | None = None, prompt: PasswordPrompt | None = None
) -> tuple[Engine, str | None]:
    """An engine that has logged in once; asks ``prompt`` for a password when the server wants one.

    Returns ``(engine, password_used)``. Raises :class:`DatabaseAuthError` (wrong or missing
    password), :class:`DatabaseUnavailableError` (server unreachable) or
    :class:`LabelDatabaseError`.
    """
    asked = False
    if target.is_server and not password:
        password = _LOGGED_IN.get(_login_key(target))
    while True:
        engine = make_engine(target, password)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            if target.is_server and password:
                _LOGGED_IN[_login_key(target)] = password
            return engine, password
        except sa.exc.DBAPIError as exc:
            engine.dispose()
            err = describe(exc, target, password)
            if isinstance(err, DatabaseAuthError):
                _LOGGED_IN.pop(_login_key(target), None)  # changed on the server: ask again
            if isinstance(err, DatabaseAuthError) and prompt is not None and not asked:
                asked = True
                password = prompt(f"password for {target.user} on {target.display}")
                if password:
                    continue
            if not target.is_server:
                err = type(err)(f"cannot open the label database: {err}")
            if isinstance(err, DatabaseAuthError):
                raise err from None  # the driver's exception holds the login attempt's details
            raise err from exc

"""A real PostgreSQL 15 server for the reading-study tests, started once per session.

``initdb`` and ``postgres`` refuse to run as root, so the cluster is created and run as the
``postgres`` system user (``runuser``) in a temporary folder it owns, listening on 127.0.0.1 at a
random free port with its socket in that folder. TCP logins need a password (scram-sha-256), which
is what the wrong-password tests exercise; the fixture itself talks to the server as the superuser
over the Unix socket. The server is stopped and its folder removed at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")
_DB_COUNTER = iter(range(1, 1_000_000))


@dataclass
class PostgresServer:
    """A running test cluster: where it listens and how to reach it as the superuser."""

    host: str
    port: int
    socket_dir: Path
    data_dir: Path

    def admin_url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of the superuser over the Unix socket (no password)."""
        return f"postgresql+psycopg://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def url(self, user: str, database: str) -> str:
        """A ``postgresql://`` URL as a user types it (TCP, no password in it)."""
        return f"postgresql://{user}@{self.host}:{self.port}/{database}"

    def sql(self, *statements: str, database: str = "postgres") -> None:
        """Run statements as the superuser (autocommit)."""
        import psycopg

        with psycopg.connect(
            host=str(self.socket_dir), port=self.port, user="postgres", dbname=database,
            autocommit=True,
        ) as conn:  # fmt: skip
            for s in statements:
                conn.execute(s)

    def new_database(self, prefix: str = "study", coordinator_password: str = "coord-pw") -> str:
        """A fresh database owned by the ``coordinator`` role (created once, CREATEROLE)."""
        name = f"{prefix}_{os.getpid()}_{next(_DB_COUNTER)}"
        self.sql(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'coordinator') THEN "
            f"CREATE ROLE coordinator LOGIN CREATEROLE PASSWORD '{coordinator_password}'; "
            "END IF; END $$",
            f"CREATE DATABASE {name} OWNER coordinator",
        )
        return name

    def pg_ctl(self, action: str, timeout: float = 30.0) -> None:
        """Start, stop or restart the server (waits until it is done)."""
        opts = f"-h {self.host} -p {self.port} -k {self.socket_dir}"
        cmd = [str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-w", "-t", str(int(timeout))]
        if action in ("start", "restart"):
            cmd += ["-o", opts, "-l", str(self.data_dir.parent / "server.log")]
        if action in ("stop", "restart"):
            cmd += ["-m", "fast"]
        _as_postgres(cmd + [action], timeout=timeout + 10)


def _as_postgres(cmd: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """Start a throw-away PostgreSQL 15 cluster; yields a :class:`PostgresServer`."""
    if not (PG_BIN / "initdb").exists():
        pytest.fail("PostgreSQL 15 is not installed: apt-get install postgresql (make system-deps)")
    root = Path(tempfile.mkdtemp(prefix="mammo-sae-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(sock, "postgres", "postgres")
    pwfile = root / "pw"
    pwfile.write_text("superuser-not-used\n")
    if os.geteuid() == 0:
        shutil.chown(pwfile, "postgres", "postgres")
    _as_postgres(
        [str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--pwfile", str(pwfile),
         "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"],
        timeout=120,
    )  # fmt: skip
    # small and quick. fsync off: the tests kill readers and restart the server cleanly (a fast
    # shutdown writes everything), never crash the machine, so syncing to the disk proves nothing
    # here and costs seconds on a shared CI disk; the benchmark measures with the defaults.
    with open(data / "postgresql.conf", "a") as fh:
        fh.write(
            "\nmax_connections = 60\nshared_buffers = 16MB\nlog_min_messages = warning\n"
            "fsync = off\nfull_page_writes = off\n"
        )
    server = PostgresServer("127.0.0.1", _free_port(), sock, data)
    server.pg_ctl("start")
    deadline = time.monotonic() + 30
    while True:  # pg_ctl -w waited already; make sure TCP answers too
        try:
            socket.create_connection((server.host, server.port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail("PostgreSQL did not start listening within 30 s")
            time.sleep(0.1)
    try:
        yield server
    finally:
        try:
            server.pg_ctl("stop")
        except Exception:  # noqa: BLE001 - the folder goes anyway
            pass
        shutil.rmtree(root, ignore_errors=True)

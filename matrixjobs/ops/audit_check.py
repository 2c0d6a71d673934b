"""`matrixjobs audit verify --config`: the audit chain checked straight from the store, read
only (the service may be running, stopped, or this may be a backup's copy)."""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Any

import psycopg

from matrixjobs import audit as audit_log
from matrixjobs.config import Config
from matrixjobs.ops.store_probe import StoreProblem, connect_read_only
from matrixjobs.store.pg_conn import CONNECT_TIMEOUT_S, describe_url, libpq_reason
from matrixjobs.store.sqlite import AUDIT_HEAD

CHAIN = f"SELECT {audit_log.COLUMNS} FROM audit ORDER BY seq"
HEAD = "SELECT seq, hash FROM audit_head"  # PostgreSQL's, and SQLite's before AUDIT_HEAD


def check(config: Config) -> audit_log.Verdict:
    records, head = (_read_postgres(config) if config.store.backend == "postgresql"
                     else _read_sqlite(config))
    return audit_log.verify([audit_log.record_of(tuple(row)) for row in records],
                            (int(head[0]), str(head[1])))


def _read_sqlite(config: Config) -> tuple[list[Any], Any]:
    path = config.store.path
    if not path.is_file():
        raise StoreProblem(f"{path}: there is no store")
    try:
        with contextlib.closing(connect_read_only(path)) as db:
            db.execute("BEGIN")  # one snapshot: the service may append meanwhile
            return db.execute(CHAIN).fetchall(), db.execute(_sqlite_head(db)).fetchone()
    except sqlite3.Error as exc:
        raise StoreProblem(f"cannot read the audit log in {path}: {exc}") from None


def _sqlite_head(db: sqlite3.Connection) -> str:
    """A store not yet migrated (a backup's copy) still keeps its head in a row."""
    kept = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'audit_head'").fetchone()
    return HEAD if kept else AUDIT_HEAD


def _read_postgres(config: Config) -> tuple[list[Any], Any]:
    url = config.store.database_url
    if url is None:
        raise StoreProblem("[store] url or MATRIXJOBS_DATABASE_URL must name the database")
    where = describe_url(url.get_secret_value())
    try:
        with psycopg.connect(url.get_secret_value(), connect_timeout=int(CONNECT_TIMEOUT_S),
                             application_name="matrixjobs audit verify") as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            return conn.execute(CHAIN).fetchall(), conn.execute(HEAD).fetchone()
    except psycopg.Error as exc:
        raise StoreProblem(f"cannot read the audit log at {where}: "
                           f"{libpq_reason(exc)}") from None

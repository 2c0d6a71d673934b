"""Look at the PostgreSQL store without changing it: safe while the service runs.

Read-only queries on a connection of its own; never takes the owner lock, only asks
who holds it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import psycopg

from matrixjobs.models import Worker
from matrixjobs.ops.store_probe import StoreProblem
from matrixjobs.store.postgres import (
    CONNECT_TIMEOUT_S,
    MIGRATIONS,
    OWNER_LOCK,
    describe_url,
    libpq_reason,
)
from matrixjobs.store.rows import RUNNING_BY_OWNER, WORKER_COLUMNS, with_running, worker_from_row

PG_SCHEMA_VERSION = len(MIGRATIONS)
HOLDER_SQL = (
    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
    "(SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND (l.classid::bigint << 32 | l.objid::bigint) = %s"
)


@dataclass(frozen=True, slots=True)
class PgState:
    where: str  # host:port/database
    schema_version: int
    can_write: bool
    holder: str | None  # who holds the owner lock: "matrixjobs pid N on HOST"
    workers: list[Worker]  # every worker row, silent ones too


def probe_postgres(url: str) -> PgState:
    where = describe_url(url)
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT_S),
                               application_name="matrixjobs doctor")
    except psycopg.Error as exc:
        raise StoreProblem(f"cannot connect to PostgreSQL at {where}: "
                           f"{libpq_reason(exc)}") from None
    try:
        with contextlib.closing(conn):
            version = _schema_version(conn)
            return PgState(where, version, _can_write(conn, version),
                           _scalar(conn, HOLDER_SQL, (OWNER_LOCK,)), _workers(conn))
    except psycopg.Error as exc:
        raise StoreProblem(f"PostgreSQL at {where} answers, but: {libpq_reason(exc)}") from None


def _schema_version(conn: psycopg.Connection[Any]) -> int:
    if _scalar(conn, "SELECT to_regclass('schema_version')") is None:
        return 0
    return int(_scalar(conn, "SELECT coalesce(max(version), 0) FROM schema_version"))


def _can_write(conn: psycopg.Connection[Any], version: int) -> bool:
    if version == 0:  # the service creates its tables at start
        return bool(_scalar(conn, "SELECT coalesce(has_schema_privilege(current_schema(), "
                                  "'CREATE'), false)"))
    return bool(_scalar(conn, "SELECT has_table_privilege('jobs', 'INSERT, UPDATE, DELETE')"))


def _workers(conn: psycopg.Connection[Any]) -> list[Worker]:
    if _scalar(conn, "SELECT to_regclass('workers')") is None:  # before migration 2
        return []
    with conn.transaction():  # one snapshot of the rows and the jobs they hold
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        rows = conn.execute(f"SELECT {WORKER_COLUMNS} FROM workers ORDER BY name, id").fetchall()
        running = conn.execute(RUNNING_BY_OWNER).fetchall()
    return with_running([worker_from_row(row) for row in rows], running)


def _scalar(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]

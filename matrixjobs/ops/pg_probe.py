"""Look at the PostgreSQL store without changing it: safe while the service runs.

Read-only queries on a connection of its own.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import psycopg

from matrixjobs.models import Worker
from matrixjobs.ops.store_probe import StoreProblem
from matrixjobs.store.pg_conn import CONNECT_TIMEOUT_S, describe_url, libpq_reason
from matrixjobs.store.postgres import MIGRATIONS
from matrixjobs.store.rows import RUNNING_BY_OWNER, WORKER_COLUMNS, with_running, worker_from_row

PG_SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True, slots=True)
class PgState:
    where: str  # host:port/database
    schema_version: int
    can_write: bool
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
            return PgState(where, version, _can_write(conn, version), _workers(conn))
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

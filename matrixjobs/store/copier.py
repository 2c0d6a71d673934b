"""Copy every row of an open SQLite store into an open, empty PostgreSQL store, in one
PostgreSQL transaction: ids are kept (j12 stays j12) and the id sequences continue after
the highest id SQLite ever handed out, so a purged job's id is not given again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from matrixjobs.errors import StoreError
from matrixjobs.store.postgres import PostgresStore
from matrixjobs.store.rows import NUMBERED_TABLES, TABLES
from matrixjobs.store.sqlite import AUDIT_HEAD, SqliteStore


class TargetNotEmptyError(StoreError):
    """The PostgreSQL database already holds matrixjobs rows."""


@dataclass(frozen=True, slots=True)
class Copied:
    counts: dict[str, int]  # rows per table, in TABLES order
    last_ids: dict[str, int]  # the highest id SQLite handed out, per numbered table


async def copy_store(source: SqliteStore, target: PostgresStore) -> Copied:
    rows = {table: await _read(source, table, columns) for table, columns in TABLES}
    last_ids = {table: await _last_id(source, table) for table in NUMBERED_TABLES}
    [(seq, hash_, _at)] = await source.db.execute_fetchall(AUDIT_HEAD)
    try:
        async with target.pool.connection() as conn, conn.transaction():
            await _refuse_data(conn, target.where)
            for table, columns in TABLES:
                await _write(conn, table, columns, rows[table])
            for table, last in last_ids.items():
                await _continue_after(conn, table, last)
            # The audit chain goes on from where it ended.
            await conn.execute("UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1",
                               (seq, hash_))
            # The service that ran them is stopped: their leases are over, so the first
            # node to start recovers them at once instead of after the copied lease.
            await conn.execute("UPDATE jobs SET lease_expires_at = 0 "
                               "WHERE status = 'processing'")
    except psycopg.Error as exc:
        raise StoreError(f"copying into PostgreSQL at {target.where} failed, nothing was "
                         f"written: {' '.join(str(exc).split())}") from None
    return Copied({table: len(rows[table]) for table, _ in TABLES}, last_ids)


async def _read(source: SqliteStore, table: str, columns: str) -> list[tuple[Any, ...]]:
    # The service is stopped (the caller holds its lock): nothing changes between reads.
    rows = await source.db.execute_fetchall(f"SELECT {columns} FROM {table} ORDER BY rowid")
    return [tuple(row) for row in rows]


async def _last_id(source: SqliteStore, table: str) -> int:
    # AUTOINCREMENT remembers ids of purged rows in sqlite_sequence; max(id) alone may not.
    rows = await source.db.execute_fetchall(
        f"SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = ?), 0), "
        f"coalesce((SELECT max(id) FROM {table}), 0))", (table,))
    return int(next(iter(rows))[0])


async def _refuse_data(conn: psycopg.AsyncConnection[Any], where: str) -> None:
    found = []
    for table, _ in TABLES:
        cursor = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(table)))
        row = await cursor.fetchone()
        if row and row[0]:
            found.append(f"{row[0]} {table.replace('_', ' ')}")
    if found:
        raise TargetNotEmptyError(
            f"PostgreSQL at {where} already holds matrixjobs data ({', '.join(found)}); "
            "migrate-store only fills a database without any: name an empty one")


async def _write(conn: psycopg.AsyncConnection[Any], table: str, columns: str,
                 rows: list[tuple[Any, ...]]) -> None:
    # COPY's text input reads SQLite's 0/1 as booleans and its integers as floats.
    names = sql.SQL(", ").join(sql.Identifier(name.strip()) for name in columns.split(","))
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(sql.Identifier(table), names)
    async with conn.cursor().copy(statement) as copy:
        for row in rows:
            await copy.write_row(row)


async def _continue_after(conn: psycopg.AsyncConnection[Any], table: str, last: int) -> None:
    if last == 0:
        return  # a fresh sequence starts at 1 already
    await conn.execute("SELECT setval(pg_get_serial_sequence(%s, 'id'), %s)", (table, last))

"""Exclusive roles among the processes sharing a PostgreSQL store (the Matrix bot's leader).

A role is a session advisory lock (`pg_try_advisory_lock`) taken on a connection of its
own, outside the pool: the lock lives exactly as long as that session. How it ends:

- the holder resigns, or its process dies (even `kill -9`): the socket closes, the server
  ends the session and frees the lock at once;
- the session is terminated (`pg_terminate_backend`, a server restart): the holder's next
  check fails and it gives the role up;
- the holder's host or network is lost: nothing closes the socket, so the session sets
  `idle_session_timeout` to `lease_s` (PostgreSQL ≥ 14) and the holder checks it every
  `lease_s/6`: a session silent for `lease_s` is ended by the server, which frees the lock.
  The holder, for its part, gives the role up once no check has been answered for
  `lease_s/3`, well before anyone else can take it.

The lock key is "mj" and a CRC-32 of the role's name, in the 64-bit key space the store's
other advisory locks use (see postgres.py). Each connection's `application_name` says which
process holds a role, in `pg_stat_activity` and in the standbys' log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from typing import Any

import psycopg

from matrixjobs.store.pg_conn import answered

log = logging.getLogger(__name__)

ROLE_KEY_BASE = 0x6D6A << 32


def role_key(role: str) -> int:
    return ROLE_KEY_BASE | zlib.crc32(role.encode())


class RoleLocks:
    """The roles this process holds or waits for, one dedicated connection each."""

    def __init__(self, url: str, connect_kwargs: dict[str, Any]) -> None:
        self._url = url
        self._connect_kwargs = connect_kwargs
        self._conns: dict[str, psycopg.AsyncConnection[Any]] = {}
        self._leases: dict[str, float] = {}  # the roles held, with their lease_s

    async def try_lead(self, role: str, lease_s: float) -> bool:
        if role in self._leases:
            return await self.leading(role)
        conn = await self._connection(role, lease_s)
        try:
            cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", (role_key(role),))
            row = await cursor.fetchone()
        except psycopg.Error:
            await self.resign(role)
            raise
        if row and row[0]:
            self._leases[role] = lease_s
            return True
        return False

    async def _connection(self, role: str, lease_s: float) -> psycopg.AsyncConnection[Any]:
        """The role's connection, kept while standing by (a new one after it broke)."""
        conn = self._conns.get(role)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        conn = await psycopg.AsyncConnection.connect(self._url, **self._connect_kwargs)
        try:
            await conn.execute("SELECT set_config('idle_session_timeout', %s, false)",
                               (str(int(lease_s * 1000)),))
        except psycopg.Error:
            await _close(conn)
            raise
        self._conns[role] = conn
        return conn

    async def leading(self, role: str) -> bool:
        """Asks the lock's session; no answer within `lease_s/6` counts as lost (and the
        role is given up), so that the caller's checks every `lease_s/6` notice a silent
        server within `lease_s/3`."""
        lease_s = self._leases.get(role)
        conn = self._conns.get(role)
        if lease_s is None or conn is None:
            return False
        try:
            await answered(conn, "SELECT 1", lease_s / 6)
        except psycopg.Error as exc:
            log.warning("role %s: its PostgreSQL session did not answer (%s); giving it up",
                        role, type(exc).__name__)
            await self.resign(role)
            return False
        return True

    async def resign(self, role: str) -> None:
        """Give the role up (closing its session frees the lock) and stop standing by."""
        self._leases.pop(role, None)
        conn = self._conns.pop(role, None)
        if conn is not None:
            await _close(conn)

    async def holder(self, role: str) -> str | None:
        """The `application_name` of the session holding `role`, if any."""
        conn = self._conns.get(role)
        if conn is None or conn.closed:
            return None
        cursor = await conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND (l.classid::bigint << 32 | l.objid::bigint) = %s", (role_key(role),))
        row = await cursor.fetchone()
        return str(row[0]) if row and row[0] else None

    async def close(self) -> None:
        for role in list(self._conns):
            await self.resign(role)


async def _close(conn: psycopg.AsyncConnection[Any]) -> None:
    # A connection to a lost host must not hold up giving the role up: its session ends
    # on the server anyway (idle_session_timeout).
    with contextlib.suppress(psycopg.Error, TimeoutError):
        await asyncio.wait_for(conn.close(), 1.0)

"""What every PostgreSQL connection of ours shares: the connect timeout, and how a server
and libpq's errors are named in messages (never with the password)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

CONNECT_TIMEOUT_S = 5.0
# A host or network lost without a word (no RST) would leave a query waiting for the
# kernel's retransmission timeout (many minutes): keepalives and tcp_user_timeout end such
# a connection within seconds. Values in seconds, tcp_user_timeout in milliseconds.
KEEPALIVE = {"keepalives": 1, "keepalives_idle": 2, "keepalives_interval": 1,
             "keepalives_count": 2, "tcp_user_timeout": 3000}


def describe_url(url: str) -> str:
    """`host:port/database` of a connection URL: what messages may name (never the password)."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(an unreadable PostgreSQL URL)"
    host = parts.get("host") or "localhost"
    return f"{host}:{parts.get('port') or 5432}/{parts.get('dbname') or '(default database)'}"


def libpq_reason(exc: psycopg.Error) -> str:
    """libpq's own words on one line (they name host and port, never the password)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or (
        type(exc).__name__)


async def answered(conn: psycopg.AsyncConnection[Any], statement: str, timeout_s: float) -> None:
    """Run `statement`, or raise psycopg.OperationalError if no answer within `timeout_s`."""
    # Cancelling a query makes psycopg send a cancel request and wait for it (seconds on a
    # black-holed path); shutting the socket down instead fails the query at once, and the
    # descriptor stays open until close(), so no other connection can reuse its number meanwhile.
    loop = asyncio.get_running_loop()
    timer = loop.call_later(timeout_s, _shut_down, conn)
    try:
        await conn.execute(statement)
    except psycopg.OperationalError:
        if loop.time() < timer.when():
            raise
        raise psycopg.OperationalError(
            f"no answer to {statement!r} within {timeout_s:g} s") from None
    finally:
        timer.cancel()


def _shut_down(conn: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(OSError, psycopg.Error), socket.socket(
            fileno=os.dup(conn.pgconn.socket)) as sock:
        sock.shutdown(socket.SHUT_RDWR)

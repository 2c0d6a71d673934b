"""Wake-ups across processes: LISTEN/NOTIFY on one channel, and a listener that never goes deaf.

A payload is `"<kind> <id>,<id>,..."` (ids only: NOTIFY carries at most 8000 bytes, so the
receiver reads the rest from the tables). Senders call `notify` inside their writing
transaction, so the notification is delivered at commit, and only if it commits.

`Listener` holds a connection of its own, outside any pool (LISTEN belongs to a session). A
dropped LISTEN connection once left procrastinate's workers polling-only for months without
anyone noticing (its issues #1425, #1334), so the listener probes an idle connection every
second, notices a killed backend or a silent network path within about two seconds, and
reconnects with a capped backoff. Whatever was sent while it was deaf is lost: `on_reconnect`
tells the owner to re-read the state it may have missed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from matrixjobs.store.pg_conn import (
    CONNECT_TIMEOUT_S,
    KEEPALIVE,
    answered,
    describe_url,
    libpq_reason,
)

log = logging.getLogger(__name__)

CHANNEL = "matrixjobs"
# NOTIFY refuses payloads of 8000 bytes or more; the margin leaves room for a longer kind.
MAX_PAYLOAD_BYTES = 7900
# An idle connection is probed this often; a probe unanswered for PROBE_TIMEOUT_S means it is dead.
IDLE_S = 1.0
PROBE_TIMEOUT_S = 1.0
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0


def payloads(kind: str, ids: Sequence[str]) -> list[str]:
    """The payloads announcing `ids` as `kind`, each below NOTIFY's size limit."""
    if not kind or any(c.isspace() or c == "," for c in kind):
        raise ValueError(f"a notification kind is one word, not {kind!r}")
    prefix = f"{kind} "
    chunks: list[str] = []
    current: list[str] = []
    size = len(prefix.encode())
    for id_ in ids:
        if not id_ or any(c.isspace() or c == "," for c in id_):
            raise ValueError(f"a notified id has no spaces or commas: {id_!r}")
        cost = len(id_.encode()) + (1 if current else 0)
        if size + cost >= MAX_PAYLOAD_BYTES and current:
            chunks.append(prefix + ",".join(current))
            current, size, cost = [], len(prefix.encode()), len(id_.encode())
        if size + cost >= MAX_PAYLOAD_BYTES:
            raise ValueError(f"a notified id is too long ({len(id_.encode())} bytes)")
        current.append(id_)
        size += cost
    if current:
        chunks.append(prefix + ",".join(current))
    return chunks


async def notify(conn: psycopg.AsyncConnection[Any], kind: str, ids: Sequence[str]) -> None:
    """Announce `ids` on CHANNEL; inside a transaction, delivered when it commits."""
    if chunks := payloads(kind, ids):
        await conn.execute("SELECT pg_notify(%s, p) FROM unnest(%s::text[]) p", (CHANNEL, chunks))


def parse_payload(payload: str) -> tuple[str, list[str]] | None:
    """(kind, ids) of a payload; None when it is not one `payloads` makes."""
    kind, _, rest = payload.partition(" ")
    ids = rest.split(",")
    if not kind or not all(ids) or any(c.isspace() for c in rest):
        return None
    return kind, ids


class Listener:
    """LISTENs on CHANNEL until cancelled: `on_message(kind, ids)` for each notification.

    Both callbacks are plain functions called on the listener's task: they should only record
    or schedule work (set an event, queue ids), so that reading notifications never waits on
    them. `on_reconnect()` runs once LISTEN is active again after any failure (a lost
    connection or a failed attempt): notifications sent in the gap were missed.
    """

    def __init__(self, url: str, on_message: Callable[[str, list[str]], None],
                 on_reconnect: Callable[[], None]) -> None:
        self._url = url
        self.where = describe_url(url)
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self._connected = False
        self._down_since: float | None = None

    @property
    def connected(self) -> bool:
        """True while LISTEN is active on a connection believed alive."""
        return self._connected

    async def run(self) -> None:
        """Listen until cancelled, reconnecting whenever the connection fails."""
        delay = BACKOFF_MIN_S
        while True:
            up_since = time.monotonic()
            try:
                await self._listen()
            except psycopg.Error as exc:
                self._lost(libpq_reason(exc))
            # A connection that stays up earns a fast retry; one that keeps dying at once
            # (or never comes up) backs off, so a broken server never gets hammered.
            if time.monotonic() - up_since > BACKOFF_MAX_S:
                delay = BACKOFF_MIN_S
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _listen(self) -> None:
        name = f"matrixjobs listener pid {os.getpid()} on {socket.gethostname()}"
        conn = await psycopg.AsyncConnection.connect(
            self._url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT_S),
            application_name=name[:63], **KEEPALIVE)
        try:
            await answered(conn, f"LISTEN {CHANNEL}", PROBE_TIMEOUT_S)
            self._up()
            await self._consume(conn)
        finally:
            self._connected = False
            # close(), not the context manager's exit: that may wait on a dead server.
            await conn.close()

    async def _consume(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            idle = True
            async for note in conn.notifies(timeout=IDLE_S):
                idle = False
                self._deliver(note.payload)
            if idle:
                await answered(conn, "SELECT 1", PROBE_TIMEOUT_S)

    def _deliver(self, payload: str) -> None:
        message = parse_payload(payload)
        if message is None:
            log.debug("skipped a malformed notification: %r", payload[:200])
            return
        try:
            self._on_message(*message)
        except Exception:
            log.exception("handling a %s notification failed", message[0])

    def _up(self) -> None:
        self._connected = True
        if self._down_since is None:
            return
        log.info("LISTEN on PostgreSQL at %s is back after %.1f s", self.where,
                 time.monotonic() - self._down_since)
        self._down_since = None
        try:
            self._on_reconnect()
        except Exception:
            log.exception("re-reading state after reconnecting failed")

    def _lost(self, reason: str) -> None:
        if self._down_since is not None:
            log.debug("LISTEN on PostgreSQL at %s still down: %s", self.where, reason)
            return
        self._down_since = time.monotonic()
        log.warning("LISTEN on PostgreSQL at %s down: %s; reconnecting", self.where, reason)

"""The LISTEN/NOTIFY listener on a real PostgreSQL, directly and through a proxy that fails."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import time
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest
from tcp_proxy import ProxyProcess, TcpProxy

from matrixjobs.store.pg_listen import (
    CHANNEL,
    MAX_PAYLOAD_BYTES,
    Listener,
    notify,
    parse_payload,
    payloads,
)

PASSWORD = "Pw-never-in-logs-7c1e"  # trust auth ignores it; it must not leak all the same
# The listener's retry delay reaches 1.6-3.2 s during 3 s of refused connections.
BACKOFF_AFTER_3_S = 3.2


class Heard:
    """What a listener's callbacks received."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[tuple[str, list[str], float]] = asyncio.Queue()
        self.reconnects = 0

    def message(self, kind: str, ids: list[str]) -> None:
        self.messages.put_nowait((kind, ids, time.perf_counter()))

    def reconnect(self) -> None:
        self.reconnects += 1

    async def next(self, timeout: float = 2.0) -> tuple[str, list[str]]:
        kind, ids, _ = await asyncio.wait_for(self.messages.get(), timeout)
        return kind, ids


def with_password(url: str, port: int = 5432) -> str:
    database = url.rsplit("/", 1)[1]
    return f"postgresql://{getpass.getuser()}:{PASSWORD}@127.0.0.1:{port}/{database}"


async def until(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until `condition()` held; fails the test after `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


@contextlib.asynccontextmanager
async def listening(url: str) -> AsyncIterator[tuple[Listener, Heard]]:
    heard = Heard()
    listener = Listener(url, heard.message, heard.reconnect)
    task = asyncio.create_task(listener.run())
    try:
        await until(lambda: listener.connected, 5)
        yield listener, heard
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def sender(url: str) -> AsyncIterator[psycopg.AsyncConnection]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        yield conn


async def kill_listeners(conn: psycopg.AsyncConnection) -> int:
    cursor = await conn.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name LIKE 'matrixjobs listener%' AND datname = current_database()")
    row = await cursor.fetchone()
    return row[0] if row else 0


# -- payloads ----------------------------------------------------------------------------------

def test_payloads_split_many_ids_below_the_notify_limit_and_parse_back():
    ids = [f"j{n}" for n in range(20_000)]
    chunks = payloads("new", ids)
    assert len(chunks) > 1
    assert all(len(chunk.encode()) < MAX_PAYLOAD_BYTES for chunk in chunks)
    parsed = [parse_payload(chunk) for chunk in chunks]
    assert [id_ for _, part in parsed for id_ in part] == ids
    assert {kind for kind, _ in parsed} == {"new"}


def test_payloads_of_no_ids_are_none():
    assert payloads("cancel", []) == []


@pytest.mark.parametrize("kind, ids", [
    ("", ["j1"]), ("two words", ["j1"]), ("new", [""]), ("new", ["j 1"]), ("new", ["j1,j2"]),
    ("new", ["x" * MAX_PAYLOAD_BYTES]),
])
def test_payloads_refuse_what_could_not_be_parsed_back(kind, ids):
    with pytest.raises(ValueError):
        payloads(kind, ids)


@pytest.mark.parametrize("payload", [
    "", "new", "new ", " j1", "new j1,,j2", "new j1, j2", "new j1 ",
])
def test_malformed_payloads_parse_to_none(payload):
    assert parse_payload(payload) is None


# -- a real server -------------------------------------------------------------------------------

async def test_a_notify_from_another_connection_arrives_within_100_ms(pg_url):
    async with listening(pg_url) as (_, heard), sender(pg_url) as conn:
        sent = time.perf_counter()
        await notify(conn, "new", ["j1", "j2"])
        kind, ids, received = await asyncio.wait_for(heard.messages.get(), 2)
    assert (kind, ids) == ("new", ["j1", "j2"])
    assert received - sent < 0.1


async def test_twenty_thousand_ids_arrive_intact_in_one_transaction(pg_url):
    ids = [f"j{n}" for n in range(1, 20_001)]
    async with listening(pg_url) as (_, heard), sender(pg_url) as conn:
        async with conn.transaction():
            await notify(conn, "change", ids)
        received: list[str] = []
        while len(received) < len(ids):
            kind, part = await heard.next()
            assert kind == "change"
            received += part
    assert received == ids


async def test_a_notify_is_delivered_at_commit_and_never_after_a_rollback(pg_url):
    async with listening(pg_url) as (_, heard), sender(pg_url) as conn:
        with contextlib.suppress(ZeroDivisionError):
            async with conn.transaction():
                await notify(conn, "new", ["j1"])
                raise ZeroDivisionError
        async with conn.transaction():
            await notify(conn, "new", ["j2"])
            await asyncio.sleep(0.2)
            assert heard.messages.empty()
        assert await heard.next() == ("new", ["j2"])


async def test_malformed_payloads_are_skipped_and_later_ones_still_arrive(pg_url):
    async with listening(pg_url) as (listener, heard), sender(pg_url) as conn:
        for payload in ["", "new", "new j1,,j2", "new j1 j2", "new j3"]:
            await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
        assert await heard.next() == ("new", ["j3"])
        assert listener.connected and heard.messages.empty()


async def test_a_callback_that_raises_does_not_stop_the_listener(pg_url, caplog):
    received: list[list[str]] = []

    def fussy(kind: str, ids: list[str]) -> None:
        received.append(ids)
        if ids == ["j1"]:
            raise RuntimeError("a bug in the caller")

    listener = Listener(pg_url, fussy, lambda: None)
    task = asyncio.create_task(listener.run())
    try:
        await until(lambda: listener.connected, 5)
        async with sender(pg_url) as conn:
            await notify(conn, "new", ["j1"])
            await notify(conn, "new", ["j2"])
        await until(lambda: len(received) == 2, 2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert "handling a new notification failed" in caplog.text


async def test_a_killed_backend_is_replaced_within_2_s_and_the_owner_told_to_re_read(pg_url):
    async with listening(pg_url) as (listener, heard), sender(pg_url) as conn:
        assert await kill_listeners(conn) == 1
        await until(lambda: not listener.connected, 1)
        assert await until(lambda: listener.connected, 2) < 2
        assert heard.reconnects == 1
        await notify(conn, "cancel", ["j7"])
        assert await heard.next() == ("cancel", ["j7"])


async def test_a_server_gone_for_3_s_is_reconnected_after_it_returns(pg_url):
    async with TcpProxy("127.0.0.1", 5432) as proxy, \
            listening(with_password(pg_url, proxy.port)) as (listener, heard), \
            sender(pg_url) as conn:
        proxy.cut()
        await until(lambda: not listener.connected, 1)
        await asyncio.sleep(3)
        proxy.restore()
        await until(lambda: listener.connected, BACKOFF_AFTER_3_S + 1)
        assert heard.reconnects == 1
        await notify(conn, "new", ["j1"])
        assert await heard.next() == ("new", ["j1"])


async def test_a_silent_network_path_is_noticed_within_3_s_and_reconnected(pg_url):
    async with TcpProxy("127.0.0.1", 5432) as proxy, \
            listening(with_password(pg_url, proxy.port)) as (listener, heard), \
            sender(pg_url) as conn:
        proxy.blackhole()
        assert await until(lambda: not listener.connected, 3) < 3
        # While it is deaf the notification is lost: on_reconnect is how the owner catches up.
        await notify(conn, "new", ["j1"])
        await asyncio.sleep(0.5)
        proxy.restore()
        await until(lambda: listener.connected, 6)
        assert heard.reconnects == 1
        await notify(conn, "new", ["j2"])
        assert await heard.next() == ("new", ["j2"])


async def test_the_database_password_never_reaches_the_logs(pg_url, caplog):
    caplog.set_level(logging.DEBUG)
    async with TcpProxy("127.0.0.1", 5432) as proxy:
        url = with_password(pg_url, proxy.port)
        async with listening(url) as (listener, _), sender(pg_url) as conn:
            await kill_listeners(conn)
            await until(lambda: not listener.connected, 1)
            await until(lambda: listener.connected, 2)
            proxy.blackhole()
            await until(lambda: not listener.connected, 3)
            proxy.cut()
            await asyncio.sleep(0.5)
            proxy.restore()
            await until(lambda: listener.connected, 3)
    assert "down" in caplog.text and "is back" in caplog.text
    assert f"127.0.0.1:{proxy.port}" in caplog.text
    assert PASSWORD not in caplog.text


def test_the_proxy_cli_cuts_and_restores_from_another_process(pg_url):
    with ProxyProcess("127.0.0.1", 5432) as proxy:
        url = with_password(pg_url, proxy.port)
        with psycopg.connect(url, connect_timeout=3) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            proxy.cut()
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=3)
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=2)
        assert time.monotonic() - started >= 1.5
        proxy.restore()
        with psycopg.connect(url, connect_timeout=3) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)

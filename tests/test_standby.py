"""One bot among the nodes sharing a PostgreSQL store: the role lock and the hot standby
that runs the bot only where the lock is held (the real bot's takeover: test_standby_e2e)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest

from matrixjobs.standby import BOT_ROLE, HotStandby, Standing
from matrixjobs.store.postgres import PostgresStore
from matrixjobs.store.sqlite import SqliteStore

LEASE_S = 3.0


@pytest.fixture
async def stores(pg_url: str) -> AsyncIterator[Callable[[], PostgresStore]]:
    """Factory of open stores on one database, as separate processes would have."""
    opened: list[PostgresStore] = []

    async def make() -> PostgresStore:
        store = PostgresStore(pg_url)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


def terminate_role_sessions(url: str) -> int:
    """What an operator (or a failover) does to the holder's lock connection."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
            "AND granted AND database = (SELECT oid FROM pg_database WHERE datname = "
            "current_database())").fetchall()
    return len(rows)


async def test_one_process_leads_and_the_other_names_it(stores):
    first, second = await stores(), await stores()
    assert await first.try_lead(BOT_ROLE, LEASE_S)
    assert not await second.try_lead(BOT_ROLE, LEASE_S)
    assert await first.try_lead(BOT_ROLE, LEASE_S)  # holding it again is still leading
    assert await first.leading(BOT_ROLE) and not await second.leading(BOT_ROLE)
    assert (await second.leader(BOT_ROLE) or "").startswith("matrixjobs pid ")
    await first.resign(BOT_ROLE)
    assert not await first.leading(BOT_ROLE)
    assert await second.try_lead(BOT_ROLE, LEASE_S)


async def test_a_closed_store_frees_the_role(stores):
    first, second = await stores(), await stores()
    assert await first.try_lead(BOT_ROLE, LEASE_S)
    await first.close()
    assert await second.try_lead(BOT_ROLE, LEASE_S)


async def test_a_terminated_lock_session_loses_the_role_to_the_other(stores, pg_url):
    first, second = await stores(), await stores()
    assert await first.try_lead(BOT_ROLE, LEASE_S)
    assert terminate_role_sessions(pg_url) == 1
    assert not await first.leading(BOT_ROLE)
    assert await second.try_lead(BOT_ROLE, LEASE_S)
    assert not await first.try_lead(BOT_ROLE, LEASE_S)


async def test_a_silent_holder_loses_the_role_after_the_lease(stores):
    """A holder whose host is gone sends nothing more: the server ends its session."""
    first, second = await stores(), await stores()
    assert await first.try_lead(BOT_ROLE, 1.0)
    assert not await second.try_lead(BOT_ROLE, 1.0)
    started = time.monotonic()
    while not await second.try_lead(BOT_ROLE, 1.0):
        assert time.monotonic() - started < 3.0, "the silent holder kept the role"
        await asyncio.sleep(0.1)
    assert time.monotonic() - started >= 0.5
    assert not await first.leading(BOT_ROLE)


async def test_a_sqlite_store_always_leads(tmp_path):
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    try:
        assert await store.try_lead(BOT_ROLE, LEASE_S) and await store.leading(BOT_ROLE)
    finally:
        await store.close()


async def test_an_unreachable_database_is_a_short_error_naming_it():
    from matrixjobs.errors import StoreError

    store = PostgresStore("postgresql://127.0.0.1:1/nowhere")
    with pytest.raises(StoreError, match=r"127\.0\.0\.1:1/nowhere: cannot take the role"):
        await store.try_lead(BOT_ROLE, LEASE_S)


class Recorder:
    """Stands in for the bot: what the standby did to it, in order."""

    def __init__(self, name: str, calls: list[str]) -> None:
        self.name, self.calls = name, calls

    async def start(self) -> None:
        self.calls.append(f"{self.name} start")

    async def ready(self) -> None:
        return None

    async def stop(self) -> None:
        self.calls.append(f"{self.name} stop")

    async def drop(self) -> None:
        self.calls.append(f"{self.name} drop")


async def wait_until(check: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, "timed out"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_terminated_leader_drops_its_bot_and_the_standby_starts_its_own(stores, pg_url):
    calls: list[str] = []
    a = HotStandby(await stores(), BOT_ROLE, LEASE_S, lambda: Recorder("a", calls))
    await a.start()
    await asyncio.wait_for(a.ready(), 5)
    b = HotStandby(await stores(), BOT_ROLE, LEASE_S, lambda: Recorder("b", calls))
    await b.start()
    await asyncio.wait_for(b.ready(), 5)
    try:
        assert (a.standing, b.standing) == (Standing.LEADING, Standing.STANDBY)
        assert terminate_role_sessions(pg_url) == 1
        # a notices within lease_s/3, b tries every lease_s/3 (2 s at most)
        took = await wait_until(lambda: b.standing is Standing.LEADING, LEASE_S)
        assert calls == ["a start", "a drop", "b start"], took
        assert a.standing is Standing.STANDBY
    finally:
        await a.stop()
        await b.stop()
    assert calls[-1] == "b stop"  # a clean stop while leading sends what is left

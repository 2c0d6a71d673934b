"""Review of #17: concurrency groups at the store (both backends)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from matrixjobs.models import JobSpec
from matrixjobs.store.base import Store
from matrixjobs.store.postgres import PostgresStore
from matrixjobs.store.sqlite import SqliteStore

NOW = 1_700_000_000.0


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        opened: Store = SqliteStore(tmp_path / "s.db")
    else:
        opened = PostgresStore(request.getfixturevalue("pg_url"))
    opened.claims_groups = True
    await opened.open()
    yield opened
    await opened.close()


def grouped(name: str, group: str | None) -> JobSpec:
    return JobSpec(type="t", data={"n": name}, name=name, max_retries=1, timeout_s=5,
                   concurrency=group)


async def claim(store: Store, limit: int, owner: str) -> list[str]:
    cycle = await store.settle_and_claim([], owner, limit, NOW, 60)
    return [job.id for job in cycle.claimed]


async def test_a_busy_group_with_older_waiting_jobs_does_not_starve_another_group(store):
    """A worker with one free slot must take B's job while A's group is busy, however many
    of A's jobs wait ahead of it."""
    a1, _, _, b1 = await store.add_jobs(
        [grouped("a1", "A"), grouped("a2", "A"), grouped("a3", "A"), grouped("b1", "B")], NOW)
    assert await claim(store, 1, "w1") == [a1.id]  # A is busy from now on
    assert await claim(store, 1, "w2") == [b1.id]


async def test_a_long_backlog_in_one_group_does_not_slow_every_claim(tmp_path):
    """SQLite: each claim held the write lock for a time quadratic in a group's backlog
    (3000 waiting deploys: ~3 s per claim, every job end; 8000: ~20 s)."""
    import time
    store = SqliteStore(tmp_path / "s.db")
    store.claims_groups = True
    await store.open()
    try:
        for start in range(0, 3000, 1000):
            await store.add_jobs([grouped(f"d{i}", "deploy") for i in range(start, start + 1000)],
                                 NOW)
        began = time.perf_counter()
        assert len(await claim(store, 4, "w1")) == 1
        assert await claim(store, 4, "w2") == []
        assert time.perf_counter() - began < 1.0
    finally:
        await store.close()

"""The SQLite store's own concerns: its file, schema, locking and bad database files.

What every backend must do is in test_store_contract.py."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from matrixjobs.errors import StoreError
from matrixjobs.models import JobSpec
from matrixjobs.store.sqlite import MIGRATIONS, SqliteStore


def spec(name: str = "x", max_retries: int = 1) -> JobSpec:
    return JobSpec(type="t", data={"n": name}, name=name, max_retries=max_retries, timeout_s=5)


async def test_new_store_is_wal_with_current_schema_and_reopens(tmp_path):
    path = tmp_path / "nested" / "s.db"
    store = SqliteStore(path)
    await store.open()
    await store.add_jobs([spec()], time.time())
    await store.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"jobs", "batches", "progress_messages", "processed_events"} <= tables
    again = SqliteStore(path)
    await again.open()
    assert len(await again.list_jobs()) == 1
    await again.close()


async def test_corrupt_database_file_is_a_clear_error(tmp_path):
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="corrupt or not a matrixjobs database"):
        await SqliteStore(path).open()


async def test_second_owner_of_the_same_file_is_refused(tmp_path, store):
    with pytest.raises(StoreError, match="in use by another matrixjobs process"):
        await SqliteStore(store.path).open()


async def test_locked_database_is_a_clear_error(tmp_path):
    path = tmp_path / "s.db"
    with sqlite3.connect(path, isolation_level=None) as raw:
        raw.execute("PRAGMA journal_mode = DELETE")
        raw.execute("CREATE TABLE hold (x)")
        raw.execute("BEGIN EXCLUSIVE")
        store = SqliteStore(path, lock_wait_s=2)
        started = time.monotonic()
        with pytest.raises(StoreError, match="locked"):
            await store.open()
        assert time.monotonic() - started < 15
        raw.execute("ROLLBACK")


async def test_schema_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "s.db"
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="newer than this matrixjobs understands"):
        await SqliteStore(path).open()


async def test_unwritable_location_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot create store directory"):
        await SqliteStore(blocker / "sub" / "s.db").open()


async def test_a_store_of_the_first_schema_gains_requesters_and_keeps_its_jobs(tmp_path):
    path = tmp_path / "s.db"
    with contextlib.closing(sqlite3.connect(path)) as raw:
        raw.executescript(MIGRATIONS[0])
        raw.execute("INSERT INTO jobs (type, name, data, status, max_retries, timeout_s, "
                    "created_at) VALUES ('t', 'old', '{}', 'completed', 0, 5, 1)")
        raw.execute("PRAGMA user_version = 1")
        raw.commit()
    store = SqliteStore(path)
    await store.open()
    try:
        [old] = await store.list_jobs()
        assert old.name == "old" and old.requester is None
        [new] = await store.add_jobs([JobSpec(type="t", data={}, name="new", max_retries=0,
                                              timeout_s=5, requester="@alice:example.org")], 2)
        batch, _ = await store.add_batch("b", [JobSpec(type="t", data={}, name="op",
                                                       max_retries=0, timeout_s=5,
                                                       requester="cli")], 3)
        assert (await store.get_job(new.id)).requester == "@alice:example.org"
        assert (await store.get_batch(batch.id)).requester == "cli"
    finally:
        await store.close()


@pytest.fixture
def shell_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_store_files_are_private_whatever_the_umask(tmp_path, shell_umask):
    parent_mode = mode(tmp_path)
    path = tmp_path / "state" / "deeper" / "matrixjobs.db"
    store = SqliteStore(path)
    await store.open()
    try:
        await store.set_setting("matrix.access_token", "a-token")
        files = [path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", ".lock"))]
        assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
        assert (mode(path.parent), mode(path.parent.parent)) == (0o700, 0o700)
        assert mode(tmp_path) == parent_mode, "an existing parent is not ours to change"
    finally:
        await store.close()


async def test_store_files_an_older_version_left_readable_are_tightened(tmp_path, caplog):
    path = tmp_path / "matrixjobs.db"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    lock = path.with_name(path.name + ".lock")
    for file in (path, lock):
        file.chmod(0o644)
    store = SqliteStore(path)
    with caplog.at_level(logging.WARNING):
        await store.open()
    try:
        assert (mode(path), mode(lock)) == (0o600, 0o600)
        assert f"{path} was readable by others (mode 644): made it 600" in caplog.text
    finally:
        await store.close()

"""Faults at awkward moments: cancelled callers, store errors, rogue handlers, stops mid-claim."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time

import pytest
from helpers import final_state, make_config

from matrixjobs.app import App
from matrixjobs.errors import StoreError
from matrixjobs.models import JobSpec, Status
from matrixjobs.queue.handlers import HandlerRegistry
from matrixjobs.store.sqlite import SqliteStore


class Quick:
    async def run(self, job, progress):
        if job.data.get("raise") == "cancelled":
            raise asyncio.CancelledError
        if job.data.get("raise") == "exit":
            raise SystemExit(2)
        return None


def quick_registry() -> HandlerRegistry:
    handlers = HandlerRegistry()
    handlers.register("quick", Quick())
    return handlers


def spec(**data) -> JobSpec:
    return JobSpec("quick", data, "quick")


async def test_stop_at_any_moment_leaves_no_job_processing(tmp_path):
    rng = random.Random(7)
    config = make_config(tmp_path, queue={"max_retries": 0})
    for _ in range(6):
        app = App(config, handlers=quick_registry())
        await app.start()
        await app.queue.enqueue_many([spec()] * 1500)
        await asyncio.sleep(rng.uniform(0.0, 0.15))
        await app.stop()
        assert app.queue.running_count == 0
    store = SqliteStore(config.store.path)
    await store.open()
    try:
        assert await store.list_jobs([Status.PROCESSING]) == []
        assert await store.list_jobs([Status.FAILED]) == []
        leftovers = await store.list_jobs([Status.PENDING], limit=10_000)
        assert all(job.retry_count == 0 for job in leftovers)
    finally:
        await store.close()


async def test_cancel_right_after_a_job_is_claimed_never_hangs(tmp_path, running_app):
    class Slowish:
        async def run(self, job, progress):
            await asyncio.sleep(0.01)

    handlers = HandlerRegistry()
    handlers.register("slowish", Slowish())
    app = await running_app(make_config(tmp_path, queue={"workers": 1}), handlers=handlers)
    jobs = await app.queue.enqueue_many([JobSpec("slowish", {}, f"s{i}") for i in range(40)])
    for job in jobs[1::2]:
        try:
            result = await asyncio.wait_for(app.cancel(job.id), 5)
        except Exception as exc:  # finished before the cancel landed
            assert "already completed" in str(exc)
        else:
            assert result.status in (Status.CANCELLED, Status.COMPLETED)
    for job in jobs:
        assert (await final_state(app, job.id, timeout=10)).terminal
    assert app.queue.running_count == 0


async def test_store_stays_usable_after_callers_are_cancelled_mid_transaction(tmp_path):
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    try:
        one = JobSpec("t", {}, "t", max_retries=0, timeout_s=5)
        for steps in range(12):
            task = asyncio.ensure_future(store.add_jobs([one] * 3, time.time()))
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            jobs = await store.add_jobs([one], time.time())  # would fail inside a stale BEGIN
            assert len(jobs) == 1
        cycle = await store.settle_and_claim([], "me", 1000, time.time(), 60)
        assert cycle.claimed
    finally:
        await store.close()


async def test_dispatcher_survives_a_failing_store_read(tmp_path, running_app, caplog):
    app = await running_app(make_config(tmp_path), handlers=quick_registry())
    real_next_due = app.store.next_due
    failures = []

    async def flaky_next_due():
        if not failures:
            failures.append(1)
            raise sqlite3.OperationalError("disk I/O error")
        return await real_next_due()

    app.store.next_due = flaky_next_due
    await asyncio.sleep(1.5)  # idle long enough to call next_due
    job = await app.queue.enqueue(spec())
    assert (await final_state(app, job.id)).status == Status.COMPLETED
    assert failures and "store cycle failed" in caplog.text


async def test_handler_raising_cancelled_error_fails_like_any_error(tmp_path, running_app):
    app = await running_app(make_config(tmp_path, queue={"max_retries": 1}),
                            handlers=quick_registry())
    job = await app.queue.enqueue(spec(**{"raise": "cancelled"}))
    final = await final_state(app, job.id)
    assert final.status == Status.FAILED
    assert final.error == "CancelledError raised by the handler"
    assert final.job_details.retry_count == 1


async def test_handler_calling_sys_exit_fails_its_job_not_the_service(tmp_path, running_app):
    app = await running_app(make_config(tmp_path, queue={"max_retries": 0}),
                            handlers=quick_registry())
    bad = await app.queue.enqueue(spec(**{"raise": "exit"}))
    good = await app.queue.enqueue(spec())
    final = await final_state(app, bad.id)
    assert final.status == Status.FAILED and final.error == "SystemExit: 2"
    assert (await final_state(app, good.id)).status == Status.COMPLETED


async def test_requested_cancels_survive_a_crash(tmp_path):
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    now = time.time()
    one = JobSpec("t", {}, "t", max_retries=3, timeout_s=5)
    try:
        [single] = await store.add_jobs([one], now)
        batch, ops = await store.add_batch("b", [one, one, one], now)
        await store.settle_and_claim([], "dead", 3, now, 60)  # single + two ops run
        await store.request_cancel(single.id)
        await store.cancel_batch(batch.id, now)  # the running ops were still going
        recovery = await store.recover_interrupted("new", now)
        assert {job.id for job in recovery.cancelled} == {single.id, ops[0].id, ops[1].id}
        assert recovery.requeued == [] and recovery.failed == []
        assert (await store.get_batch(batch.id)).status == Status.CANCELLED
        assert (await store.settle_and_claim([], "new", 10, now, 60)).claimed == []
    finally:
        await store.close()


async def test_too_old_sqlite_is_refused_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    with pytest.raises(StoreError, match=r"SQLite 3.31.1 is too old: matrixjobs needs 3.35.0"):
        await SqliteStore(tmp_path / "s.db").open()

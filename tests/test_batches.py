"""Batches: several targets as one unit with aggregate state."""

from __future__ import annotations

import asyncio

import pytest
from helpers import final_state, make_config, python_target

from matrixjobs.errors import BadBatchError, UnknownTargetError
from matrixjobs.models import Status

OK = python_target("print('::progress 1/1 ok')")
FAIL = python_target("import sys; print('broken dependency'); sys.exit(2)", max_retries=0)
SLOW = python_target("""
    import time
    for i in range(100):
        print(f"::progress {i}/100 slow step {i}")
        time.sleep(0.05)
""")


def batch_config(tmp_path, **queue):
    return make_config(tmp_path, targets={"ok": OK, "fail": FAIL, "slow": SLOW},
                       queue={"workers": 2, **queue})


async def test_batch_of_successes_completes(tmp_path, running_app):
    app = await running_app(batch_config(tmp_path))
    batch = await app.submit_batch(["ok", "ok", "ok"])
    assert batch.id.startswith("b") and batch.total == 3
    final = await final_state(app, batch.id)
    assert final.status == Status.COMPLETED
    details = final.batch_details
    assert (details.total_operations, details.completed_operations,
            details.failed_operations) == (3, 3, 0)
    assert final.progress.percentage == 100.0
    jobs = await app.store.list_jobs(batch_id=batch.id)
    assert {job.batch_id for job in jobs} == {batch.id}


async def test_batch_with_a_failed_operation_fails_and_lists_the_error(tmp_path, running_app):
    app = await running_app(batch_config(tmp_path))
    batch = await app.submit_batch(["ok", "fail", "ok"], name="release")
    final = await final_state(app, batch.id)
    assert final.status == Status.FAILED
    assert final.name == "release"
    assert final.batch_details.completed_operations == 2
    assert final.batch_details.failed_operations == 1
    [error] = final.batch_details.errors
    assert "fail" in error and "broken dependency" in error


async def test_batch_events_show_the_current_operation(tmp_path, running_app):
    app = await running_app(batch_config(tmp_path, workers=1))
    batch = await app.submit_batch(["slow", "ok"])
    seen = []
    async for event in app.watch(batch.id):
        seen.append(event)
        if event.batch_details.current_operation == "slow" and event.message:
            break
    assert seen[-1].status == Status.PROCESSING
    assert seen[-1].message.startswith("slow step")
    await app.cancel(batch.id)


async def test_cancelling_a_batch_cancels_running_and_queued_operations(tmp_path, running_app):
    app = await running_app(batch_config(tmp_path, workers=1))
    batch = await app.submit_batch(["slow", "ok", "ok"])
    while (await app.status(batch.id)).status != Status.PROCESSING:
        await asyncio.sleep(0.02)
    result = await app.cancel(batch.id)
    assert result.status == Status.CANCELLED
    final = await final_state(app, batch.id)
    assert final.status == Status.CANCELLED
    assert final.batch_details.cancelled_operations == 3
    jobs = await app.store.list_jobs(batch_id=batch.id)
    assert {job.status for job in jobs} == {Status.CANCELLED}


async def test_empty_or_oversized_batches_are_refused(tmp_path, running_app):
    app = await running_app(batch_config(tmp_path, max_batch_size=3))
    with pytest.raises(BadBatchError, match="at least one operation"):
        await app.submit_batch([])
    with pytest.raises(BadBatchError, match="batch too large: 4 operations"):
        await app.submit_batch(["ok"] * 4)
    assert await app.batches() == []


async def test_batch_with_an_unknown_target_enqueues_nothing(tmp_path, running_app):
    app = await running_app(batch_config(tmp_path))
    with pytest.raises(UnknownTargetError, match=r"unknown target 'nope'.*fail, ok, slow"):
        await app.submit_batch(["ok", "nope"])
    assert await app.jobs() == [] and await app.batches() == []


async def test_cancelling_one_operation_fails_the_batch(tmp_path, running_app):
    app = await running_app(batch_config(tmp_path, workers=1))
    batch = await app.submit_batch(["slow", "ok"])
    jobs = sorted(await app.store.list_jobs(batch_id=batch.id), key=lambda j: j.id)
    await app.cancel(jobs[1].id)
    await app.cancel(jobs[0].id)
    final = await final_state(app, batch.id)
    assert final.status == Status.FAILED
    assert final.batch_details.cancelled_operations == 2

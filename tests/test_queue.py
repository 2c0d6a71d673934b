"""The queue: handlers, priorities, concurrency, retries, timeouts and cancellation,
on each store backend."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import on_backend
from helpers import final_state, make_config

from matrixjobs.errors import AlreadyFinishedError, NotFoundError, UnknownJobTypeError
from matrixjobs.models import JobSpec, Status
from matrixjobs.queue.handlers import HandlerRegistry


class Recorder:
    """A handler that records calls and does what each job's data says."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []
        self.active = 0
        self.max_active = 0
        self.release = asyncio.Event()

    async def run(self, job, progress):
        self.calls.append((job.name, time.monotonic()))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            action = job.data.get("action", "ok")
            if action == "wait":
                await self.release.wait()
            elif action == "sleep":
                await asyncio.sleep(job.data["seconds"])
            elif action == "fail_until" and job.retry_count < job.data["attempt"]:
                raise RuntimeError(f"flaky failure on attempt {job.retry_count + 1}")
            elif action == "raise":
                raise ValueError("bad value")
            return {"echo": job.name}
        finally:
            self.active -= 1


def spec(name: str, **data) -> JobSpec:
    return JobSpec(type="rec", data=data, name=name)


@pytest.fixture
async def running_app(database_url, running_app, tmp_path):
    """conftest's running_app, on each backend in turn: the queue's use of the store."""

    async def start(config=None, **kwargs):
        return await running_app(on_backend(config or make_config(tmp_path), database_url),
                                 **kwargs)

    return start


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def registry(recorder):
    handlers = HandlerRegistry()
    handlers.register("rec", recorder)
    return handlers


async def test_enqueued_job_runs_and_keeps_its_result(tmp_path, running_app, registry):
    app = await running_app(make_config(tmp_path), handlers=registry)
    job = await app.queue.enqueue(spec("hello"))
    assert job.id.startswith("j") and job.status == Status.PENDING
    final = await final_state(app, job.id)
    assert final.status == Status.COMPLETED
    stored = await app.store.get_job(job.id)
    assert stored.result == {"echo": "hello"}
    assert stored.started_at is not None and stored.finished_at >= stored.started_at


async def test_higher_priority_runs_first(tmp_path, running_app, registry, recorder):
    app = await running_app(make_config(tmp_path, queue={"workers": 1}), handlers=registry)
    blocker = await app.queue.enqueue(spec("blocker", action="wait"))
    while not recorder.calls:
        await asyncio.sleep(0.01)
    low = await app.queue.enqueue(JobSpec(type="rec", data={}, name="low", priority=0))
    high = await app.queue.enqueue(JobSpec(type="rec", data={}, name="high", priority=5))
    recorder.release.set()
    for job in (blocker, low, high):
        await final_state(app, job.id)
    assert [name for name, _ in recorder.calls] == ["blocker", "high", "low"]


async def test_no_more_jobs_run_at_once_than_workers(tmp_path, running_app, registry, recorder):
    app = await running_app(make_config(tmp_path, queue={"workers": 3}), handlers=registry)
    jobs = await app.queue.enqueue_many(
        [spec(f"s{i}", action="sleep", seconds=0.05) for i in range(12)]
    )
    for job in jobs:
        await final_state(app, job.id)
    assert recorder.max_active == 3


async def test_failed_run_is_retried_with_exponential_backoff(tmp_path, running_app, registry,
                                                              recorder):
    config = make_config(tmp_path, queue={"retry_backoff_s": 0.2, "max_retries": 3})
    app = await running_app(config, handlers=registry)
    job = await app.queue.enqueue(spec("flaky", action="fail_until", attempt=2))
    final = await final_state(app, job.id)
    assert final.status == Status.COMPLETED
    assert final.job_details.retry_count == 2
    times = [at for _, at in recorder.calls]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.2 * 0.9
    assert times[2] - times[1] >= 0.4 * 0.9


async def test_job_fails_with_the_error_once_retries_run_out(tmp_path, running_app, registry,
                                                             recorder):
    app = await running_app(make_config(tmp_path, queue={"max_retries": 1}), handlers=registry)
    job = await app.queue.enqueue(spec("broken", action="raise"))
    final = await final_state(app, job.id)
    assert final.status == Status.FAILED
    assert final.error == "ValueError: bad value"
    assert final.job_details.retry_count == 1
    assert len(recorder.calls) == 2


async def test_run_longer_than_its_timeout_fails(tmp_path, running_app, registry):
    app = await running_app(make_config(tmp_path, queue={"max_retries": 0}), handlers=registry)
    job = await app.queue.enqueue(
        JobSpec(type="rec", data={"action": "sleep", "seconds": 5}, name="slow", timeout_s=0.2)
    )
    final = await final_state(app, job.id)
    assert final.status == Status.FAILED
    assert final.error == "timed out after 0.2s"


async def test_unknown_job_type_is_refused_at_enqueue(tmp_path, running_app, registry):
    app = await running_app(make_config(tmp_path), handlers=registry)
    with pytest.raises(UnknownJobTypeError, match="no handler registered for job type 'nope'"):
        await app.queue.enqueue(JobSpec(type="nope", data={}, name="x"))
    assert await app.jobs() == []


async def test_stored_job_whose_handler_is_gone_fails_clearly(tmp_path, running_app, registry):
    config = make_config(tmp_path)
    app = await running_app(config, handlers=registry)
    job = await app.queue.enqueue(spec("held", action="wait"))
    await app.stop()  # the job goes back to pending, unfinished
    app = await running_app(config, handlers=HandlerRegistry())  # "rec" no longer exists
    final = await final_state(app, job.id)
    assert final.status == Status.FAILED
    assert final.error == "no handler registered for job type 'rec'"


async def test_cancel_pending_job_never_runs_it(tmp_path, running_app, registry, recorder):
    app = await running_app(make_config(tmp_path, queue={"workers": 1}), handlers=registry)
    blocker = await app.queue.enqueue(spec("blocker", action="wait"))
    queued = await app.queue.enqueue(spec("queued"))
    cancelled = await app.cancel(queued.id)
    assert cancelled.status == Status.CANCELLED
    recorder.release.set()
    await final_state(app, blocker.id)
    assert (await final_state(app, queued.id)).status == Status.CANCELLED
    assert [name for name, _ in recorder.calls] == ["blocker"]


async def test_cancel_running_job_stops_it(tmp_path, running_app, registry, recorder):
    app = await running_app(make_config(tmp_path), handlers=registry)
    job = await app.queue.enqueue(spec("long", action="wait"))
    while not recorder.calls:
        await asyncio.sleep(0.01)
    result = await app.cancel(job.id)
    assert result.status == Status.CANCELLED
    assert (await app.status(job.id)).status == Status.CANCELLED
    assert app.queue.running_count == 0


async def test_cancel_of_finished_or_unknown_ids_is_refused(tmp_path, running_app, registry):
    app = await running_app(make_config(tmp_path), handlers=registry)
    job = await app.queue.enqueue(spec("quick"))
    await final_state(app, job.id)
    with pytest.raises(AlreadyFinishedError, match=f"job {job.id} already completed"):
        await app.cancel(job.id)
    with pytest.raises(NotFoundError, match="no job j999"):
        await app.cancel("j999")
    with pytest.raises(NotFoundError, match="not a job or batch id"):
        await app.cancel("docs")


async def test_status_of_unknown_id_is_not_found(tmp_path, running_app, registry):
    app = await running_app(make_config(tmp_path), handlers=registry)
    with pytest.raises(NotFoundError):
        await app.status("j42")
    with pytest.raises(NotFoundError):
        await app.status("b42")
    with pytest.raises(NotFoundError):
        await app.status("../etc")


async def test_stop_requeues_running_job_without_spending_a_retry(tmp_path, running_app,
                                                                  registry, recorder):
    config = make_config(tmp_path, queue={"max_retries": 0})
    app = await running_app(config, handlers=registry)
    job = await app.queue.enqueue(spec("held", action="wait"))
    while not recorder.calls:
        await asyncio.sleep(0.01)
    await app.stop()
    recorder.release.set()
    app = await running_app(config, handlers=registry)
    final = await final_state(app, job.id)
    assert final.status == Status.COMPLETED
    assert final.job_details.retry_count == 0
    assert len(recorder.calls) == 2


async def test_handler_that_reports_garbage_progress_still_completes(tmp_path, running_app):
    class Garbage:
        async def run(self, job, progress):
            progress.report("lots", None, "??")
            progress.report(float("nan"), 10)
            progress.report(5, 0, "unknown total")
            await asyncio.sleep(0.15)
            return None

    handlers = HandlerRegistry()
    handlers.register("garbage", Garbage())
    app = await running_app(make_config(tmp_path), handlers=handlers)
    job = await app.queue.enqueue(JobSpec(type="garbage", data={}, name="g"))
    final = await final_state(app, job.id)
    assert final.status == Status.COMPLETED
    assert final.progress.current == 5 and final.progress.percentage is None
    assert final.message == "unknown total"


async def test_retention_deletes_old_finished_jobs_only(tmp_path, running_app, registry):
    app = await running_app(make_config(tmp_path, queue={"workers": 1}), handlers=registry)
    done = await app.queue.enqueue(spec("done"))
    await final_state(app, done.id)
    held = await app.queue.enqueue(spec("held", action="wait"))
    while (await app.store.get_job(held.id)).status != Status.PROCESSING:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # held is now a long run: nothing gets claimed ahead behind it
    waiting = await app.queue.enqueue(spec("waiting"))
    removed = await app.store.purge_finished(time.time() + 1)
    assert removed == 1
    assert await app.store.get_job(done.id) is None
    assert (await app.store.get_job(held.id)).status == Status.PROCESSING
    assert (await app.store.get_job(waiting.id)).status == Status.PENDING


async def test_queued_job_is_not_held_processing_behind_a_long_one(tmp_path, running_app,
                                                                   registry, recorder):
    app = await running_app(make_config(tmp_path, queue={"workers": 1}), handlers=registry)
    quick = await app.queue.enqueue_many([spec(f"quick{i}") for i in range(20)])
    for job in quick:
        await final_state(app, job.id)  # short runs: the queue starts claiming ahead
    held = await app.queue.enqueue(spec("held", action="wait"))
    queued = await app.queue.enqueue(spec("queued"))
    deadline = time.monotonic() + 3
    # Both conditions at once: right after enqueue, `queued` is pending because nothing has
    # claimed it yet (on PostgreSQL the claim of `held` may not have happened either).
    while ((await app.store.get_job(held.id)).status,
           (await app.store.get_job(queued.id)).status) != (Status.PROCESSING, Status.PENDING):
        assert time.monotonic() < deadline, "claimed-ahead job was never given back"
        await asyncio.sleep(0.05)
    recorder.release.set()
    assert (await final_state(app, queued.id)).status == Status.COMPLETED
    assert (await app.store.get_job(queued.id)).retry_count == 0


async def test_many_short_jobs_all_complete_exactly_once(tmp_path, running_app, registry,
                                                         recorder):
    app = await running_app(make_config(tmp_path, queue={"workers": 3}), handlers=registry)
    jobs = await app.queue.enqueue_many([spec(f"n{i}") for i in range(600)])
    while await app.store.list_jobs([Status.PENDING, Status.PROCESSING], limit=1):
        await asyncio.sleep(0.02)
    assert sorted(name for name, _ in recorder.calls) == sorted(f"n{i}" for i in range(600))
    done = await app.store.list_jobs([Status.COMPLETED], limit=1000)
    assert {job.id for job in done} == {job.id for job in jobs}


async def test_cancelling_a_batch_also_cancels_jobs_claimed_ahead(tmp_path, running_app,
                                                                  registry, recorder):
    app = await running_app(make_config(tmp_path, queue={"workers": 1}), handlers=registry)
    for job in await app.queue.enqueue_many([spec(f"warm{i}") for i in range(20)]):
        await final_state(app, job.id)  # short runs: the queue now claims ahead
    recorder.calls.clear()
    long = await app.queue.enqueue(spec("long", action="wait"))
    while not recorder.calls:
        await asyncio.sleep(0.001)
    batch, jobs = await app.queue.enqueue_batch("later", [spec("second"), spec("third")])
    while {j.status for j in await app.store.list_jobs(batch_id=batch.id)} != {
            Status.PROCESSING}:
        await asyncio.sleep(0.001)  # claimed ahead while the worker is busy with `long`
    result = await app.cancel(batch.id)
    assert result.status == Status.CANCELLED
    for job in jobs:
        assert (await app.store.get_job(job.id)).status == Status.CANCELLED
    recorder.release.set()
    await final_state(app, long.id)
    await asyncio.sleep(0.2)
    assert [name for name, _ in recorder.calls] == ["long"]

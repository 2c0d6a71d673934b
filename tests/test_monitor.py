"""The progress monitor: throttling, ordering, slow subscribers and memory."""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
import tracemalloc

from helpers import final_state, make_config

from matrixjobs.models import Batch, Job, JobSpec, Status
from matrixjobs.progress.monitor import ProgressMonitor
from matrixjobs.progress.reporter import ProgressReporter
from matrixjobs.queue.handlers import HandlerRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_job(number: int, status: Status = Status.PENDING, batch_id: str | None = None) -> Job:
    return Job(id=f"j{number}", type="t", name=f"job{number}", data={}, status=status,
               priority=0, retry_count=0, max_retries=0, timeout_s=10, created_at=1000.0,
               batch_id=batch_id)


def drain(subscription) -> list:
    return subscription.take_all()


def run_job(monitor: ProgressMonitor, job: Job, reporter: ProgressReporter) -> None:
    job.status = Status.PROCESSING
    monitor.job_started(job, reporter)


def test_progress_is_throttled_to_one_event_per_interval_and_latest_wins():
    clock = Clock()
    monitor = ProgressMonitor(interval_ms=500, clock=clock, monotonic=clock)
    sub = monitor.subscribe("j1")
    job, reporter = make_job(1), ProgressReporter()
    run_job(monitor, job, reporter)
    assert [e.status for e in drain(sub)] == [Status.PROCESSING]
    published = []
    for step in range(1, 1001):  # 1000 reports over 2 s, ticks every 10 ms
        reporter.report(step, 1000, f"step {step}")
        if step % 5 == 0:
            clock.now += 0.01
            monitor.tick()
            published.extend(drain(sub))
    assert 3 <= len(published) <= 5  # 2 s / 500 ms
    times = [e.updated_at.timestamp() for e in published]
    assert all(b - a >= 0.5 - 1e-6 for a, b in itertools.pairwise(times))
    clock.now += 0.5
    monitor.tick()
    [trailing] = drain(sub)
    assert trailing.progress.current == 1000 and trailing.message == "step 1000"


def test_status_changes_are_published_at_once_and_in_order():
    clock = Clock()
    monitor = ProgressMonitor(interval_ms=500, clock=clock, monotonic=clock)
    events = []
    sub = monitor.subscribe()
    job, reporter = make_job(1), ProgressReporter()
    monitor.job_queued(job)
    events += drain(sub)
    run_job(monitor, job, reporter)
    events += drain(sub)
    reporter.report(3, 10)
    job.status = Status.COMPLETED
    monitor.job_settled(job)  # no tick in between: the report is not lost either
    events += drain(sub)
    assert [e.status for e in events] == [Status.PENDING, Status.PROCESSING, Status.COMPLETED]
    assert events[-1].progress.current == 3


def test_slow_subscriber_skips_intermediate_states_but_gets_the_terminal_one():
    clock = Clock()
    monitor = ProgressMonitor(interval_ms=10, clock=clock, monotonic=clock)
    slow = monitor.subscribe()
    job, reporter = make_job(1), ProgressReporter()
    run_job(monitor, job, reporter)
    for step in range(100):
        reporter.report(step, 100)
        clock.now += 0.02
        monitor.tick()
    job.status = Status.FAILED
    monitor.job_settled(job)
    events = drain(slow)
    assert len(events) == 1 and events[0].status == Status.FAILED


def test_slow_subscriber_buffer_is_bounded_and_keeps_terminals():
    clock = Clock()
    monitor = ProgressMonitor(interval_ms=10, clock=clock, monotonic=clock, max_pending=10)
    slow = monitor.subscribe()
    for number in range(50):
        job = make_job(number)
        run_job(monitor, job, ProgressReporter())
    assert len(slow._pending) <= 10
    for number in range(5):
        job = make_job(number, Status.COMPLETED)
        monitor.job_settled(job)
    events = drain(slow)
    assert len(events) <= 10
    assert {e.id for e in events if e.terminal} == {f"j{n}" for n in range(5)}
    assert slow.missed == 0


def test_subscriber_that_never_reads_stays_bounded_and_counts_what_it_missed():
    clock = Clock()
    monitor = ProgressMonitor(interval_ms=10, clock=clock, monotonic=clock, max_pending=10)
    stalled = monitor.subscribe()
    for number in range(250):
        job = make_job(number)
        run_job(monitor, job, ProgressReporter())
        job.status = Status.COMPLETED
        monitor.job_settled(job)
    events = drain(stalled)
    assert len(events) == 100  # 10 x max_pending terminal events, the newest
    assert all(e.terminal for e in events) and events[-1].id == "j249"
    assert stalled.missed == 150


async def test_a_stalled_subscriber_does_not_block_the_queue(tmp_path, running_app):
    class Quick:
        async def run(self, job, progress):
            for step in range(50):
                progress.report(step, 50)
            return None

    handlers = HandlerRegistry()
    handlers.register("quick", Quick())
    app = await running_app(make_config(tmp_path), handlers=handlers)
    stalled = app.monitor.subscribe()  # never read
    jobs = await app.queue.enqueue_many([JobSpec("quick", {}, f"q{i}") for i in range(200)])
    for job in jobs:
        assert (await final_state(app, job.id)).status == Status.COMPLETED
    assert len(stalled._pending) <= 10 * 1000
    stalled.close()
    assert app.monitor.subscriber_count == 0


def test_eta_comes_from_the_observed_rate():
    clock = Clock()
    monitor = ProgressMonitor(interval_ms=100, clock=clock, monotonic=clock)
    sub = monitor.subscribe("j1")
    job, reporter = make_job(1), ProgressReporter()
    run_job(monitor, job, reporter)
    reporter.report(0, 100)
    clock.now += 0.2
    monitor.tick()
    for step in range(1, 11):  # 10 units per second
        clock.now += 0.1
        reporter.report(step, 100)
        monitor.tick()
    event = monitor.current("j1")
    assert event.eta_seconds is not None and abs(event.eta_seconds - 9.0) < 0.5
    drain(sub)


def test_batch_status_change_is_immediate_and_count_changes_are_throttled():
    clock = Clock()
    monitor = ProgressMonitor(interval_ms=500, clock=clock, monotonic=clock)
    sub = monitor.subscribe("b1")
    batch = Batch(id="b1", name="docs api", status=Status.PENDING, total=2, created_at=1000.0)
    monitor.batch_updated(batch)
    assert [e.status for e in drain(sub)] == [Status.PENDING]
    started = Batch(id="b1", name="docs api", status=Status.PROCESSING, total=2,
                    created_at=1000.0, started_at=1000.0)
    monitor.batch_updated(started)
    assert [e.status for e in drain(sub)] == [Status.PROCESSING]
    one_done = Batch(id="b1", name="docs api", status=Status.PROCESSING, total=2,
                     created_at=1000.0, started_at=1000.0, completed=1)
    monitor.batch_updated(one_done)
    assert drain(sub) == []
    clock.now += 0.5
    monitor.tick()
    [update] = drain(sub)
    assert update.batch_details.completed_operations == 1
    assert update.eta_seconds is not None
    done = Batch(id="b1", name="docs api", status=Status.COMPLETED, total=2, created_at=1000.0,
                 started_at=1000.0, completed=2, finished_at=clock.now)
    monitor.batch_updated(done)
    [final] = drain(sub)
    assert final.status == Status.COMPLETED and final.batch_details.completed_operations == 2
    assert monitor.active_ids() == []


def test_batch_percentage_counts_the_running_operations_progress():
    """Two of four done and a third halfway: 62.5 %, not a bar stuck at 50 % until the
    third one finishes; the ETA comes from the work done so far."""
    clock = Clock()
    monitor = ProgressMonitor(interval_ms=500, clock=clock, monotonic=clock)
    sub = monitor.subscribe("b1")
    monitor.batch_updated(Batch(id="b1", name="four", status=Status.PROCESSING, total=4,
                                created_at=1000.0, started_at=1000.0, completed=2))
    job, reporter = make_job(3, batch_id="b1"), ProgressReporter()
    run_job(monitor, job, reporter)
    reporter.report(5, 10)
    clock.now += 10.0  # 2.5 operations' work in 10 s: 1.5 left takes 6 s
    monitor.tick()
    event = [e for e in drain(sub) if e.id == "b1"][-1]
    assert event.progress.current == 2 and event.progress.total == 4  # finished operations
    assert event.progress.percentage == 62.5
    assert event.eta_seconds == 6.0


def measure_growth(run) -> tuple[int, int]:
    """Bytes and objects still allocated after `run()`, compared with before it."""
    gc.collect()
    objects_before = len(gc.get_objects())
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    run()
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    return growth, len(gc.get_objects()) - objects_before


def test_memory_stays_flat_over_100k_jobs():
    clock = Clock()
    monitor = ProgressMonitor(interval_ms=500, clock=clock, monotonic=clock)

    def lifecycle(start: int, count: int, subscription=None) -> None:
        for number in range(start, start + count):
            job, reporter = make_job(number), ProgressReporter()
            monitor.job_queued(job)
            run_job(monitor, job, reporter)
            reporter.report(1, 2, "half")
            clock.now += 0.001
            monitor.tick()
            job.status = Status.COMPLETED
            monitor.job_settled(job)
            if subscription is not None:
                drain(subscription)

    lifecycle(0, 1_000)  # warm up caches and interned strings
    growth, objects = measure_growth(lambda: lifecycle(1_000, 100_000))
    assert monitor.active_ids() == []
    assert objects < 1000 and growth < 256 * 1024, f"grew {growth} B, {objects} objects"
    # With a subscriber reading every event (fewer jobs: building events is the slow part).
    with monitor.subscribe() as reader:
        lifecycle(101_000, 1_000, reader)
        growth, objects = measure_growth(lambda: lifecycle(102_000, 10_000, reader))
    assert objects < 1000 and growth < 256 * 1024, f"grew {growth} B, {objects} objects"


async def test_report_in_a_tight_loop_does_not_stall_the_event_loop(tmp_path, running_app):
    class Tight:
        async def run(self, job, progress):
            for step in range(200_000):
                progress.report(step, 200_000)
            return None

    handlers = HandlerRegistry()
    handlers.register("tight", Tight())
    app = await running_app(make_config(tmp_path), handlers=handlers)
    sub = app.monitor.subscribe()
    started = time.perf_counter()
    job = await app.queue.enqueue(JobSpec("tight", {}, "tight"))
    await final_state(app, job.id)
    assert time.perf_counter() - started < 5
    events = [e for e in drain(sub) if e.id == job.id]
    assert len(events) <= 3  # pending, processing, completed: no event per report
    await asyncio.sleep(0)

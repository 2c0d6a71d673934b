"""The Store contract, run against every backend: SQLite and PostgreSQL must not drift.

Each test gets a fresh store of each kind (PostgreSQL: a database of its own).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from matrixjobs.errors import AlreadySubmittedError
from matrixjobs.models import (
    INTERRUPTED_BY_STOP,
    MAX_ID,
    JobSpec,
    Outcome,
    Progress,
    ProgressMessage,
    Status,
    Worker,
)
from matrixjobs.store.base import Store
from matrixjobs.store.postgres import PostgresStore
from matrixjobs.store.sqlite import SqliteStore


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        opened: Store = SqliteStore(tmp_path / "s.db")
    else:
        opened = PostgresStore(request.getfixturevalue("pg_url"))
    await opened.open()
    yield opened
    await opened.close()


def spec(name: str = "x", max_retries: int = 1, priority: int = 0, **data: object) -> JobSpec:
    return JobSpec(type="t", data=data or {"n": name}, name=name, priority=priority,
                   max_retries=max_retries, timeout_s=5)


NOW = 1_700_000_000.0


async def claim(store: Store, limit: int = 10, owner: str = "me", now: float = NOW) -> list[str]:
    cycle = await store.settle_and_claim([], owner, limit, now, 60)
    return [job.id for job in cycle.claimed]


# -- adding and claiming ------------------------------------------------------------------

async def test_claim_takes_due_jobs_by_priority_then_age(store):
    low, high, other_low = await store.add_jobs(
        [spec("low"), spec("high", priority=9), spec("low2")], NOW)
    cycle = await store.settle_and_claim([], "me", 2, NOW, 60)
    assert [j.id for j in cycle.claimed] == [high.id, low.id]
    assert all(j.status == Status.PROCESSING and j.started_at == NOW for j in cycle.claimed)
    assert await claim(store) == [other_low.id]
    assert await claim(store) == []


async def test_added_jobs_read_back_exactly_as_written(store):
    data = {"z": 1, "a": [1.5, None, "ü"], "nested": {"emoji": "🚀", "quote": "'\""}}
    [job] = await store.add_jobs([JobSpec("t", data, "näme", priority=-3, max_retries=4,
                                          timeout_s=7, requester="@alice:x")], NOW)
    stored = await store.get_job(job.id)
    assert stored == job
    assert list(stored.data) == ["z", "a", "nested"]
    assert (stored.priority, stored.max_retries, stored.timeout_s, stored.requester) == (
        -3, 4, 7.0, "@alice:x")


async def test_many_jobs_at_once_get_increasing_ids_in_order(store):
    jobs = await store.add_jobs([spec(f"n{i}") for i in range(1201)], NOW)
    numbers = [int(job.id[1:]) for job in jobs]
    assert numbers == sorted(numbers) and len(set(numbers)) == 1201
    assert [j.name for j in jobs] == [f"n{i}" for i in range(1201)]
    assert (await store.get_job(jobs[700].id)).name == "n700"


async def test_jobs_wait_until_they_are_due(store):
    [job] = await store.add_jobs([spec()], NOW)
    await store.settle_and_claim([], "me", 1, NOW, 60)
    retry = Outcome(job.id, Status.FAILED, NOW, error="boom", retry_at=NOW + 30)
    await store.settle_and_claim([retry], "me", 0, NOW, 60)
    assert await store.next_due() == NOW + 30
    assert await claim(store, now=NOW + 29) == []
    assert await claim(store, now=NOW + 30) == [job.id]
    assert await store.next_due() is None


async def test_a_dedupe_key_adds_work_only_once(store):
    [job] = await store.add_jobs([spec()], NOW, dedupe_key="$event1")
    with pytest.raises(AlreadySubmittedError) as raised:
        await store.add_jobs([spec()], NOW, dedupe_key="$event1")
    assert raised.value.subject_id == job.id
    batch, _ = await store.add_batch("b", [spec(), spec()], NOW, dedupe_key="$event2")
    with pytest.raises(AlreadySubmittedError) as raised:
        await store.add_batch("b", [spec()], NOW, dedupe_key="$event2")
    assert raised.value.subject_id == batch.id
    assert len(await store.list_jobs()) == 3
    assert len(await store.list_batches()) == 1


async def test_show_records_where_a_single_job_or_a_batch_is_shown(store):
    show = ProgressMessage("ignored", "!room:x", None, "@alice:x", "$cmd")
    [job] = await store.add_jobs([spec()], NOW, show=show)
    batch, _ = await store.add_batch("b", [spec()], NOW + 1, show=show)
    await store.add_jobs([spec(), spec()], NOW + 2, show=show)  # two jobs: nothing to show
    assert await store.open_messages() == [
        ProgressMessage(job.id, "!room:x", None, "@alice:x", "$cmd"),
        ProgressMessage(batch.id, "!room:x", None, "@alice:x", "$cmd"),
    ]


# -- settling -----------------------------------------------------------------------------

async def test_outcomes_record_result_error_progress_and_log(store):
    ok, bad = await store.add_jobs([spec("ok"), spec("bad")], NOW)
    await claim(store)
    await store.settle_and_claim([
        Outcome(ok.id, Status.COMPLETED, NOW + 5, result={"out": [1, 2]},
                progress=Progress(10, 10, "done"), log="line 1\nline 2\n"),
        Outcome(bad.id, Status.FAILED, NOW + 6, error="Traceback\nValueError: no"),
    ], "me", 0, NOW + 6, 60)
    done, failed = await store.get_job(ok.id), await store.get_job(bad.id)
    assert (done.status, done.result, done.finished_at) == (
        Status.COMPLETED, {"out": [1, 2]}, NOW + 5)
    assert (done.progress.current, done.progress.total, done.progress.message) == (
        10, 10, "done")
    assert await store.get_log(ok.id) == "line 1\nline 2\n"
    assert (failed.status, failed.error, failed.result) == (
        Status.FAILED, "Traceback\nValueError: no", None)
    assert await store.get_log(bad.id) is None


async def test_a_retry_goes_back_to_pending_and_spends_a_retry_unless_told_not_to(store):
    spent, kept = await store.add_jobs([spec("spent"), spec("kept")], NOW)
    await claim(store)
    await store.settle_and_claim([
        Outcome(spent.id, Status.FAILED, NOW, error="flaky", retry_at=NOW + 1),
        Outcome(kept.id, Status.FAILED, NOW, error="stopped", retry_at=NOW + 1,
                count_retry=False),
    ], "me", 0, NOW, 60)
    first, second = await store.get_job(spent.id), await store.get_job(kept.id)
    assert (first.status, first.retry_count, first.run_after, first.error) == (
        Status.PENDING, 1, NOW + 1, "flaky")
    assert (second.status, second.retry_count, second.finished_at) == (Status.PENDING, 0, None)


async def test_outcome_of_a_job_someone_else_owns_is_ignored(store):
    [job] = await store.add_jobs([spec()], NOW)
    await store.settle_and_claim([], "me", 1, NOW, 60)
    await store.settle_and_claim([Outcome(job.id, Status.COMPLETED, NOW)], "intruder", 0, NOW, 60)
    assert (await store.get_job(job.id)).status == Status.PROCESSING


async def test_settling_and_claiming_share_one_cycle(store):
    first, second = await store.add_jobs([spec("a"), spec("b")], NOW)
    assert await claim(store, limit=1) == [first.id]
    cycle = await store.settle_and_claim([Outcome(first.id, Status.COMPLETED, NOW)], "me", 1,
                                         NOW, 60)
    assert [j.id for j in cycle.claimed] == [second.id]
    assert (await store.get_job(first.id)).status == Status.COMPLETED


async def test_heartbeat_saves_progress_of_running_jobs_only(store):
    running, waiting = await store.add_jobs([spec("r"), spec("w")], NOW)
    await claim(store, limit=1)
    await store.heartbeat("me", {running.id: Progress(3, 10, "three"),
                                 waiting.id: Progress(1, None)}, NOW, 60)
    stored = await store.get_job(running.id)
    assert (stored.progress.current, stored.progress.total, stored.progress.message) == (
        3, 10, "three")
    assert (await store.get_job(waiting.id)).progress is None


async def test_logs_are_saved_while_running_and_replaced_by_the_final_one(store):
    running, waiting = await store.add_jobs([spec("r"), spec("w")], NOW)
    await claim(store, limit=1)
    await store.save_logs({running.id: "partial", waiting.id: "not running"})
    assert await store.get_log(running.id) == "partial"
    assert await store.get_log(waiting.id) is None
    await store.settle_and_claim([Outcome(running.id, Status.COMPLETED, NOW, log="whole")],
                                 "me", 0, NOW, 60)
    assert await store.get_log(running.id) == "whole"
    await store.save_logs({running.id: "too late"})
    assert await store.get_log(running.id) == "whole"


# -- recovery and cancelling ----------------------------------------------------------------

async def test_recovery_requeues_or_fails_orphaned_jobs(store):
    """At start, the jobs of processes known to be gone are orphans at once."""
    retry, last = await store.add_jobs([spec("retry", 1), spec("last", 0)], NOW)
    await store.settle_and_claim([], "dead-process", 2, NOW, 60, worker="node-a")
    recovery = await store.recover_interrupted("new-process", NOW + 1,
                                               orphans=["dead-process"])
    assert [j.id for j in recovery.requeued] == [retry.id]
    assert [j.id for j in recovery.failed] == [last.id]
    retried = await store.get_job(retry.id)
    assert (retried.status, retried.retry_count, retried.run_after) == (
        Status.PENDING, 1, NOW + 1)
    failed = await store.get_job(last.id)
    assert (failed.status, failed.error, failed.finished_at) == (
        Status.FAILED, "interrupted", NOW + 1)


async def test_recovery_resumes_a_stopped_owners_jobs_and_honours_cancels(store):
    resumed, cancelled, mine = await store.add_jobs([spec("r", 0), spec("c"), spec("m")], NOW)
    await store.settle_and_claim([], "stopped", 2, NOW, 60, worker="node-a")
    await store.settle_and_claim([], "new", 1, NOW, 60, worker="node-a")
    await store.request_cancel(cancelled.id)
    recovery = await store.recover_interrupted("new", NOW, stopped_owner="stopped",
                                               orphans=["stopped"])
    assert [j.id for j in recovery.cancelled] == [cancelled.id]
    assert [j.id for j in recovery.resumed] == [resumed.id]
    assert recovery.requeued == recovery.failed == []
    back = await store.get_job(resumed.id)
    assert (back.status, back.retry_count, back.error) == (
        Status.PENDING, 0, INTERRUPTED_BY_STOP)
    assert (await store.get_job(mine.id)).status == Status.PROCESSING


async def test_recovery_cancels_a_job_given_back_to_a_cancelled_batch(store):
    """A claimed-ahead job released after its batch was cancelled waits, pending, for a
    claim that never comes (claims skip cancelled batches): recovery ends it."""
    batch, (ahead,) = await store.add_batch("b", [spec("a")], NOW)
    await claim(store, limit=1, owner="dead")
    await store.cancel_batch(batch.id, NOW)
    await store.settle_and_claim([Outcome(ahead.id, Status.PENDING, NOW, retry_at=NOW,
                                          count_retry=False)], "dead", 0, NOW, 60)
    recovery = await store.recover_interrupted("new", NOW + 1, orphans=["dead"])
    assert [j.id for j in recovery.cancelled] == [ahead.id]
    assert (await store.get_batch(batch.id)).status == Status.CANCELLED


async def test_jobs_claimed_ahead_and_never_started_come_back_without_a_retry(store):
    first, second, third = await store.add_jobs([spec("1", 0), spec("2", 0), spec("3", 0)], NOW)
    claimed = (await store.settle_and_claim([], "dead", 3, NOW, 60, ahead=2)).claimed
    assert [(j.id, j.started_at) for j in claimed] == [
        (first.id, NOW), (second.id, None), (third.id, None)]
    # The second started (told with the next cycle); the third never did.
    await store.settle_and_claim([], "dead", 0, NOW + 1, 60, started=[second.id])
    assert (await store.get_job(second.id)).started_at == NOW + 1
    recovery = await store.recover_interrupted("new", NOW + 2, orphans=["dead"])
    assert [j.id for j in recovery.resumed] == [third.id]
    assert [j.id for j in recovery.failed] == [first.id, second.id]
    back = await store.get_job(third.id)
    assert (back.status, back.retry_count, back.error, back.started_at) == (
        Status.PENDING, 0, None, None)


async def test_expired_leases_are_recovered_by_anyone_and_live_ones_kept(store):
    """Leases are timed by the store's clock (PostgreSQL: the server's): real time here."""
    lease_s = 1.0
    dead, alive, last = await store.add_jobs([spec("d", 1), spec("a", 1), spec("l", 0)],
                                             time.time())
    await store.settle_and_claim([], "dead", 1, time.time(), lease_s, worker="w1")
    await store.settle_and_claim([], "alive", 1, time.time(), lease_s, worker="w2")
    await store.settle_and_claim([], "dead2", 1, time.time(), lease_s, worker="w3")
    assert (await store.recover_expired(time.time())).requeued == []
    await asyncio.sleep(lease_s * 0.6)
    beat = await store.heartbeat("alive", {}, time.time(), lease_s, [alive.id])
    assert (beat.lost, beat.cancel) == ([], [])
    await asyncio.sleep(lease_s * 0.6)
    recovery = await store.recover_expired(time.time())
    assert [j.id for j in recovery.requeued] == [dead.id]
    assert [j.id for j in recovery.failed] == [last.id]
    assert (await store.get_job(alive.id)).status == Status.PROCESSING
    # The dead worker's outcome comes too late: its job was taken back (fencing).
    await store.settle_and_claim([Outcome(dead.id, Status.COMPLETED, time.time())], "dead", 0,
                                 time.time(), lease_s)
    assert (await store.get_job(dead.id)).status == Status.PENDING
    # ...and its heartbeat tells it so.
    assert (await store.heartbeat("dead", {}, time.time(), lease_s, [dead.id])).lost == [
        dead.id]


async def test_a_held_job_the_owner_does_not_name_keeps_no_lease(store):
    """A claim whose answer never reached its process (the connection dropped at commit):
    the process does not know the job, its heartbeats leave it out, and its lease runs out."""
    lease_s = 0.5
    known, stray = await store.add_jobs([spec("k"), spec("s")], time.time())
    await store.settle_and_claim([], "w", 2, time.time(), lease_s)
    await asyncio.sleep(lease_s * 0.6)
    await store.heartbeat("w", {}, time.time(), lease_s, [known.id])
    await asyncio.sleep(lease_s * 0.6)
    recovery = await store.recover_expired(time.time())
    assert [j.id for j in recovery.requeued] == [stray.id]
    assert (await store.get_job(known.id)).status == Status.PROCESSING


async def test_heartbeat_reports_cancels_asked_for_elsewhere(store):
    job, other = await store.add_jobs([spec("j"), spec("o")], NOW)
    await claim(store, limit=2, owner="runner")
    await store.request_cancel(job.id)
    beat = await store.heartbeat("runner", {job.id: Progress(1, 2, "half")}, NOW, 60,
                                 [job.id, other.id])
    assert (beat.lost, beat.cancel) == ([], [job.id])
    assert (await store.get_job(job.id)).progress == Progress(1, 2, "half")


async def test_save_progress_only_for_the_owner(store):
    job, = await store.add_jobs([spec("j")], NOW)
    await claim(store, limit=1, owner="runner")
    await store.save_progress({job.id: Progress(3, 4, "x")}, "someone-else")
    assert (await store.get_job(job.id)).progress is None
    await store.save_progress({job.id: Progress(3, 4, "x")}, "runner")
    assert (await store.get_job(job.id)).progress == Progress(3, 4, "x")
    assert [j.id for j in await store.get_jobs([job.id, "j999", "b1"])] == [job.id]


async def test_claims_route_by_labels_and_record_the_worker(store):
    anywhere, gpu, gpu_arm = await store.add_jobs([
        spec("any"), JobSpec(type="t", data={}, name="g", max_retries=0, timeout_s=5,
                             runs_on=["gpu"]),
        JobSpec(type="t", data={}, name="ga", max_retries=0, timeout_s=5,
                runs_on=["gpu", "arm"])], NOW)
    assert gpu.runs_on == ["gpu"] and gpu_arm.runs_on == ["arm", "gpu"]
    plain = await store.settle_and_claim([], "p", 10, NOW, 60, labels=[], worker="plain")
    assert [j.id for j in plain.claimed] == [anywhere.id]
    assert plain.claimed[0].worker == "plain"
    only_gpu = await store.settle_and_claim([], "g", 10, NOW, 60, labels=["gpu"], worker="g1")
    assert [j.id for j in only_gpu.claimed] == [gpu.id]
    both = await store.settle_and_claim([], "b", 10, NOW, 60, labels=["arm", "gpu", "x"],
                                        worker="b1")
    assert [j.id for j in both.claimed] == [gpu_arm.id]
    stored = await store.get_job(gpu_arm.id)
    assert (stored.worker, stored.runs_on) == ("b1", ["arm", "gpu"])


async def test_cancel_pending_cancels_only_pending_jobs(store):
    pending, running = await store.add_jobs([spec("p"), spec("r")], NOW)
    await store.settle_and_claim([], "me", 0, NOW, 60)
    assert await claim(store, limit=1) == [pending.id]
    assert await store.cancel_pending(pending.id, NOW) is None
    job, batch = await store.cancel_pending(running.id, NOW + 1)
    assert (job.id, job.status, job.error, job.finished_at, batch) == (
        running.id, Status.CANCELLED, "cancelled", NOW + 1, None)
    assert await store.cancel_pending(running.id, NOW) is None


async def test_cancel_batch_cancels_pending_lists_running_and_stops_claims(store):
    batch, jobs = await store.add_batch("b", [spec(f"o{i}") for i in range(4)], NOW)
    [other] = await store.add_jobs([spec("other")], NOW)
    assert await claim(store, limit=1) == [jobs[0].id]
    cancel = await store.cancel_batch(batch.id, NOW + 1)
    assert sorted(j.id for j in cancel.cancelled) == sorted(j.id for j in jobs[1:])
    assert cancel.running == [jobs[0].id]
    assert (cancel.batch.status, cancel.batch.cancelled, cancel.batch.cancel_requested) == (
        Status.PROCESSING, 3, True)
    assert await claim(store) == [other.id]
    cycle = await store.settle_and_claim(
        [Outcome(jobs[0].id, Status.CANCELLED, NOW + 2, error="cancelled")], "me", 0, NOW + 2, 60)
    assert [(b.id, b.status, b.finished_at) for b in cycle.batches] == [
        (batch.id, Status.CANCELLED, NOW + 2)]
    assert await store.cancel_batch("b999", NOW) is None


# -- batches ------------------------------------------------------------------------------

async def test_a_batch_moves_from_pending_to_its_final_state_with_its_errors(store):
    batch, (a, b) = await store.add_batch("site", [spec("a"), spec("b")], NOW)
    assert (await store.get_batch(batch.id)).status == Status.PENDING
    cycle = await store.settle_and_claim([], "me", 2, NOW + 1, 60)
    assert [(x.status, x.started_at) for x in cycle.batches] == [(Status.PROCESSING, NOW + 1)]
    await store.settle_and_claim([
        Outcome(a.id, Status.COMPLETED, NOW + 2),
        Outcome(b.id, Status.FAILED, NOW + 2, error="Traceback\nboom"),
    ], "me", 0, NOW + 2, 60)
    done = await store.get_batch(batch.id)
    assert (done.status, done.completed, done.failed, done.finished_at) == (
        Status.FAILED, 1, 1, NOW + 2)
    assert done.errors == [f"{b.id} b: boom"]
    assert [j.id for j in await store.list_jobs(batch_id=batch.id)] == [b.id, a.id]
    [listed] = await store.list_batches([Status.FAILED])
    assert listed.errors == done.errors
    assert await store.list_batches([Status.PENDING]) == []


# -- reading ------------------------------------------------------------------------------

async def test_list_filters_by_status_newest_first_with_a_limit(store):
    a, b, c = await store.add_jobs([spec("a"), spec("b"), spec("c")], NOW)
    await claim(store, limit=1)
    assert [j.id for j in await store.list_jobs([Status.PENDING])] == [c.id, b.id]
    assert [j.id for j in await store.list_jobs([Status.PENDING, Status.PROCESSING])] == [
        c.id, b.id, a.id]
    assert [j.id for j in await store.list_jobs(limit=2)] == [c.id, b.id]
    assert await store.count_jobs() == {Status.PENDING: 2, Status.PROCESSING: 1}


async def test_ids_that_are_not_ours_or_unknown_find_nothing(store):
    for missing in ("j1", "b1", "x1", "j", "jabc", f"j{MAX_ID}", "b-1"):
        assert await store.get_job(missing) is None
        assert await store.get_batch(missing) is None
        assert await store.get_log(missing) is None
    assert await store.previous_outcome("nonsense") is None


async def test_previous_outcome_is_the_last_completed_or_failed_run_of_the_same_name(store):
    first, cancelled, latest = await store.add_jobs([spec("w"), spec("w"), spec("w")], NOW)
    await claim(store)
    await store.settle_and_claim([
        Outcome(first.id, Status.FAILED, NOW + 1, error="x"),
        Outcome(cancelled.id, Status.CANCELLED, NOW + 2, error="cancelled"),
    ], "me", 0, NOW, 60)
    await store.settle_and_claim([Outcome(latest.id, Status.COMPLETED, NOW + 3)], "me", 0, NOW, 60)
    assert await store.previous_outcome(latest.id) == Status.FAILED
    assert await store.previous_outcome(first.id) is None


# -- interfaces' state ----------------------------------------------------------------------

async def test_progress_messages_round_trip_and_are_found_by_event(store):
    message = ProgressMessage("j1", "!room:x", "$orig", "@alice:x", "$cmd")
    await store.save_message(message, NOW)
    assert await store.open_messages() == [message]
    assert await store.get_message("j1") == message
    assert await store.message_subject("!room:x", "$orig") == "j1"
    assert await store.message_subject("!other:x", "$orig") is None
    await store.update_message("j1", edits=5, final=True)
    assert await store.open_messages() == []
    assert await store.get_message("j1") == ProgressMessage(
        "j1", "!room:x", "$orig", "@alice:x", "$cmd", edits=5, final=True)
    assert await store.get_message("j2") is None


async def test_settings_are_replaced_not_added(store):
    assert await store.get_setting("device_id") is None
    await store.set_setting("device_id", "ABC")
    await store.set_setting("device_id", "DEF")
    assert await store.get_setting("device_id") == "DEF"


async def test_purge_deletes_what_finished_before_the_cutoff_with_its_logs(store):
    old, new, running = await store.add_jobs([spec("o"), spec("n"), spec("r")], NOW,
                                             dedupe_key="$old")
    batch, [op] = await store.add_batch("b", [spec("op")], NOW)
    await store.save_message(ProgressMessage(old.id, "!r:x", "$m", "@a:x", "$c"), NOW)
    await claim(store)
    await store.settle_and_claim([
        Outcome(old.id, Status.COMPLETED, NOW + 1, log="old log"),
        Outcome(op.id, Status.COMPLETED, NOW + 1),
    ], "me", 0, NOW + 1, 60)
    await store.settle_and_claim([Outcome(new.id, Status.COMPLETED, NOW + 100)], "me", 0,
                                 NOW + 100, 60)
    removed = await store.purge_finished(NOW + 50)
    assert removed == 3  # the batch (its job goes with it), the old job, the dedupe key
    assert await store.get_job(old.id) is None and await store.get_log(old.id) is None
    assert await store.get_batch(batch.id) is None and await store.get_job(op.id) is None
    assert await store.get_message(old.id) is None
    assert (await store.get_job(new.id)).status == Status.COMPLETED
    assert (await store.get_job(running.id)).status == Status.PROCESSING
    await store.add_jobs([spec()], NOW, dedupe_key="$old")  # the key was forgotten


async def test_the_store_reopens_with_its_jobs(store):
    [job] = await store.add_jobs([spec()], time.time())
    await store.close()
    await store.open()
    assert (await store.get_job(job.id)).name == "x"


# -- the fleet ------------------------------------------------------------------------------

def worker(id_: str, name: str, heartbeat_at: float = NOW, labels: list[str] | None = None
           ) -> Worker:
    return Worker(id=id_, name=name, host="h", pid=7, role="worker", labels=labels or [],
                  slots=4, version="1.0", started_at=NOW - 10, heartbeat_at=heartbeat_at)


async def test_workers_read_back_by_name_with_the_jobs_they_hold(store):
    await store.register_worker(worker("id-b", "build-02", labels=["x86", "gpu"]))
    await store.register_worker(worker("id-a", "build-01"))
    jobs = await store.add_jobs([spec(f"n{i}") for i in range(11)], NOW)
    assert await claim(store, 2, owner="id-b") == [jobs[0].id, jobs[1].id]
    assert await claim(store, 9, owner="id-a") == [j.id for j in jobs[2:]]
    await store.settle_and_claim([Outcome(jobs[2].id, Status.COMPLETED, NOW + 1)], "id-a", 0,
                                 NOW + 1, 60)
    a, b = await store.list_workers()
    assert (a.name, b.name) == ("build-01", "build-02")
    assert a.running == [j.id for j in jobs[3:]]  # j10 after j9: by number, not as text
    expected = worker("id-b", "build-02", labels=["gpu", "x86"])
    expected.running = [jobs[0].id, jobs[1].id]
    assert b == expected  # every column as written, labels sorted


async def test_registering_again_replaces_the_row_and_unregistering_deletes_it(store):
    await store.register_worker(worker("id-a", "old"))
    await store.register_worker(worker("id-a", "new", heartbeat_at=NOW + 5))
    [row] = await store.list_workers()
    assert (row.name, row.heartbeat_at, row.running) == ("new", NOW + 5, [])
    await store.unregister_worker("id-a")
    await store.unregister_worker("id-unknown")
    assert await store.list_workers() == []


async def test_silent_workers_stay_listed_until_retention_purges_them(store):
    await store.register_worker(worker("id-quiet", "quiet", heartbeat_at=NOW - 600))
    await store.register_worker(worker("id-live", "live", heartbeat_at=NOW))
    live, quiet = await store.list_workers()
    assert (live.name, quiet.name) == ("live", "quiet")
    assert live.alive(NOW, 30) and not quiet.alive(NOW, 30)
    assert await store.purge_finished(NOW - 60) == 0
    assert [w.name for w in await store.list_workers()] == ["live"]

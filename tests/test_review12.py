"""Review of #12 (workers on many machines): reproductions of defects found by an
adversarial reading, each against the real PostgreSQL server and, where the defect needs
them, real `matrixjobs` processes. A test marked xfail is a limitation known and documented."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import psycopg
import pytest
from fleet import api, free_port, node_config, python_command, start, wait_for
from helpers import make_config

from matrixjobs.app import App
from matrixjobs.models import JobSpec, Outcome, Status
from matrixjobs.store.postgres import PostgresStore


def spec(name: str = "op", retries: int = 0) -> JobSpec:
    return JobSpec(type="t", data={}, name=name, max_retries=retries, timeout_s=60)


async def _settle(store: PostgresStore, job_id: str, owner: str) -> None:
    done = Outcome(job_id, Status.COMPLETED, time.time())
    await store.settle_and_claim([done], owner, 0, time.time(), 60)


async def test_a_batch_whose_last_jobs_end_on_two_workers_at_once_finishes(pg_url):
    one, two = PostgresStore(pg_url), PostgresStore(pg_url)
    await one.open()
    await two.open()
    try:
        batch, _ = await one.add_batch("b", [spec("a"), spec("b")], time.time())
        [first] = (await one.settle_and_claim([], "w1", 1, time.time(), 60)).claimed
        [second] = (await two.settle_and_claim([], "w2", 1, time.time(), 60)).claimed
        # A third session holds the batch row for a moment, as a third worker's settle of
        # the same batch would: both settles count their jobs, then wait for the row.
        async with await psycopg.AsyncConnection.connect(pg_url) as blocker:
            async with blocker.transaction():
                await blocker.execute("SELECT 1 FROM batches WHERE id = %s FOR UPDATE",
                                      (int(batch.id[1:]),))
                settles = asyncio.gather(_settle(one, first.id, "w1"),
                                         _settle(two, second.id, "w2"))
                await asyncio.sleep(0.5)
            await settles
        jobs = await one.list_jobs(batch_id=batch.id)
        assert [j.status for j in jobs] == [Status.COMPLETED, Status.COMPLETED]
        final = await one.get_batch(batch.id)
        assert final is not None
        assert (final.status, final.completed) == (Status.COMPLETED, 2)
    finally:
        await one.close()
        await two.close()


def recording(seconds: float, runs: Path, retries: int = 0) -> dict[str, object]:
    """A target that notes each run (job id and pid) in `runs`, then works `seconds`."""
    return {"command": python_command(f"""
        import os, time
        with open({str(runs)!r}, "a") as f:
            f.write(os.environ["MATRIXJOBS_JOB_ID"] + " " + str(os.getpid()) + "\\n")
        time.sleep({seconds})
    """), "max_retries": retries}


def job_state(port: int, job_id: str) -> dict[str, object]:
    return api(port, "GET", f"/v1/jobs/{job_id}")


@pytest.mark.timeout(90)
def test_a_second_worker_with_the_same_name_leaves_the_first_ones_jobs_alone(tmp_path, pg_url):
    port = free_port()
    runs = tmp_path / "runs"
    targets = {"slow": recording(4.0, runs)}
    node = start(tmp_path / "node", node_config(tmp_path / "node", pg_url, targets, workers=0,
                                                api_port=port), "run", "node")
    first = start(tmp_path / "a", node_config(tmp_path / "a", pg_url, targets, workers=1,
                                              name="box"), "worker", "a")
    second = None
    try:
        job = api(port, "POST", "/v1/jobs", {"target": "slow"})
        wait_for(lambda: runs.exists() and runs.read_text(), 20, "the job running")
        second = start(tmp_path / "b", node_config(tmp_path / "b", pg_url, targets, workers=1,
                                                   name="box"), "worker", "b")
        final = wait_for(lambda: (s := job_state(port, job["id"]))["status"]
                         not in ("pending", "processing") and s, 30, "the job's end")
    finally:
        first.stop()
        if second is not None:
            second.stop()
        node.stop()
    assert (final["status"], final.get("error")) == ("completed", None), final
    assert len(runs.read_text().splitlines()) == 1


# Whether jobs are claimed ahead at the moment of the kill depends on timing: before
# claimed-ahead jobs were told apart, this failed in 4 of 5 runs (3 to 8 jobs failed
# without a run); the contract test of `ahead` is the deterministic one.
@pytest.mark.timeout(120)
async def test_jobs_a_killed_worker_claimed_ahead_but_never_started_are_not_failed(
        tmp_path, pg_url):
    lease_s, workers = 2, 2
    runs = tmp_path / "runs"
    targets = {"fast": {"command": ["sh", "-c", f"echo $MATRIXJOBS_JOB_ID >> {runs}"]}}
    store = PostgresStore(pg_url)
    await store.open()
    worker = start(tmp_path / "w1", node_config(tmp_path / "w1", pg_url, targets,
                                                workers=workers, name="w1", lease_s=lease_s),
                   "worker", "w1")
    try:
        fast = JobSpec(type="command", data={"target": "fast", "args": []}, name="fast",
                       max_retries=0, timeout_s=60)
        await store.add_jobs([fast] * 3000, time.time())
        wait_for(lambda: runs.exists() and len(runs.read_text().splitlines()) >= 300, 60,
                 "jobs running fast enough to be claimed ahead")
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait()
        await asyncio.sleep(lease_s + 0.5)
        await store.recover_expired(time.time())
        failed = await store.list_jobs([Status.FAILED], limit=10_000)
    finally:
        worker.stop()
        await store.close()
    ran = set(runs.read_text().split())
    never_ran = sorted((j.id for j in failed if j.id not in ran), key=lambda i: int(i[1:]))
    # Up to one job per slot may have been spawned without writing its line yet.
    assert len(never_ran) <= workers, f"{len(never_ran)} failed without running: {never_ran[:20]}"


async def test_a_node_with_its_clock_ahead_does_not_take_over_a_healthy_workers_job(pg_url):
    lease_s, skew = 10.0, 15.0
    worker, node = PostgresStore(pg_url), PostgresStore(pg_url)
    await worker.open()
    await node.open()
    try:
        await node.add_jobs([spec(retries=1)], time.time())
        [job] = (await worker.settle_and_claim([], "w1", 1, time.time(), lease_s)).claimed
        beat = await worker.heartbeat("w1", {}, time.time(), lease_s, [job.id])
        assert beat.lost == []
        await node.recover_expired(time.time() + skew)  # the skewed node's sweep
        beat = await worker.heartbeat("w1", {}, time.time(), lease_s, [job.id])
    finally:
        await worker.close()
        await node.close()
    assert beat.lost == []


async def test_a_job_run_elsewhere_ends_once_in_the_run_nodes_stream_however_often_announced(
        tmp_path, pg_url):
    config = make_config(tmp_path, targets={"t": {"command": ["true"]}},
                         queue={"workers": 0}, api={"enabled": False},
                         store={"backend": "postgresql", "url": pg_url})
    app = App(config)
    other = PostgresStore(pg_url)
    await app.start()
    await other.open()
    ends = []

    async def collect() -> None:
        async for event in app.monitor.subscribe():
            if event.status.terminal:
                ends.append(event)

    collecting = asyncio.create_task(collect())
    try:
        job = await app.submit("t")
        [claimed] = (await other.settle_and_claim([], "elsewhere", 1, time.time(), 60,
                                                  worker="w9")).claimed
        await other.settle_and_claim([Outcome(claimed.id, Status.COMPLETED, time.time())],
                                     "elsewhere", 0, time.time(), 60)
        assert app.remote is not None
        app.remote.changed([job.id])  # the claim's news, read after the job ended
        await asyncio.sleep(1.0)
        app.remote.changed([job.id])  # the settle's news
        await asyncio.sleep(1.0)
    finally:
        collecting.cancel()
        await other.close()
        await app.stop()
    assert [(e.id, e.status) for e in ends] == [(job.id, Status.COMPLETED)]

"""Second review of #12 (after the first review's fixes): reproductions against the real
PostgreSQL server and, where the finding needs them, real `matrixjobs` processes. A test
marked xfail(strict=True) reproduces a defect present today."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from helpers import make_config

from matrixjobs.app import App
from matrixjobs.progress.events import JobProgressEvent
from matrixjobs.store.postgres import PostgresStore

# RemoteFeed's periodic full read (remote.RESYNC_S) plus a margin.
AFTER_RESYNC_S = 6.5


@pytest.mark.xfail(strict=True, reason="RemoteFeed tells the end of a job the run node ran "
                   "itself a second time: follow() marks it, and a run shorter than the "
                   "5 s resync is never seen held by queue.runs()")
@pytest.mark.timeout(60)
async def test_a_job_the_run_node_runs_itself_ends_once_in_its_stream(tmp_path, pg_url):
    config = make_config(tmp_path, targets={"t": {"command": ["true"]}},
                         queue={"workers": 2}, api={"enabled": False},
                         store={"backend": "postgresql", "url": pg_url})
    app = App(config)
    other = PostgresStore(pg_url)  # a second process on the store, as a worker would be
    await app.start()
    await other.open()
    events: list[JobProgressEvent] = []

    async def collect() -> None:
        async for event in app.monitor.subscribe():
            events.append(event)

    collecting = asyncio.create_task(collect())
    try:
        jobs = [await app.submit("t") for _ in range(5)]
        deadline = time.monotonic() + 20
        while {j.id for j in jobs} - {e.id for e in events if e.status.terminal}:
            assert time.monotonic() < deadline, "jobs did not end"
            await asyncio.sleep(0.05)
        await asyncio.sleep(AFTER_RESYNC_S)
        ran_here = {j.id for j in await app.store.get_jobs([j.id for j in jobs])
                    if j.worker == config.worker.name}
    finally:
        collecting.cancel()
        await other.close()
        await app.stop()
    assert ran_here, "the run node ran none of them itself"
    ends = Counter(e.id for e in events if e.status.terminal)
    assert {job_id: ends[job_id] for job_id in ran_here} == dict.fromkeys(ran_here, 1)

"""Second review of #12 (after the first review's fixes): reproductions against the real
PostgreSQL server and, where the finding needs them, real `matrixjobs` processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

import pytest
import test_standby_e2e
from helpers import make_config
from test_standby_e2e import LEASE_S

from matrixjobs.app import App
from matrixjobs.progress.events import JobProgressEvent

scene = test_standby_e2e.scene  # two bot nodes, a leading and b standing by

# RemoteFeed's periodic full read (remote.RESYNC_S) plus a margin.
AFTER_RESYNC_S = 6.5


@pytest.mark.timeout(60)
async def test_a_job_the_run_node_runs_itself_ends_once_in_its_stream(tmp_path, pg_url):
    config = make_config(tmp_path, targets={"t": {"command": ["true"]}},
                         queue={"workers": 2}, api={"enabled": False},
                         store={"backend": "postgresql", "url": pg_url})
    app = App(config)
    await app.start()
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
        await app.stop()
    assert ran_here, "the run node ran none of them itself"
    ends = Counter(e.id for e in events if e.status.terminal)
    assert {job_id: ends[job_id] for job_id in ran_here} == dict.fromkeys(ran_here, 1)



@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_leader_frozen_past_its_lease_answers_nothing_once_thawed(scene):
    room, nodes = scene
    build = room.alice.send(room.room, "!build slow")
    room.answer(build)
    os.kill(nodes["a"].process.pid, signal.SIGSTOP)
    try:
        nodes["b"].wait_for_log("bot: leading", timeout=LEASE_S * 3)
        nodes["b"].wait_for_log("matrix: logged in as")
        during = room.alice.send(room.room, "!status")
        room.answer(during)
    finally:
        os.kill(nodes["a"].process.pid, signal.SIGCONT)
    nodes["a"].wait_for_log("bot: lost the lead", timeout=LEASE_S * 2)
    after = room.alice.send(room.room, "!targets")
    room.answer(after)
    time.sleep(3)  # a's bot, were it still answering, would have by now
    for command in (build, during, after):
        assert len(room.answers(command)) == 1, command

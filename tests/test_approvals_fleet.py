"""Approvals across nodes (found by the #19 review): two processes on one PostgreSQL store
(as two `matrixjobs run` nodes). Node A queued the held job and shows its room message /
dashboard; node B takes the first of two approvals (through its API or dashboard). A's
monitor must show "1/2"."""
from __future__ import annotations

import asyncio

from conftest import on_backend
from helpers import make_config, python_target

from matrixjobs.app import App
from matrixjobs.policy import Caller, Place

ALICE, BOB = "@alice:example.org", "@bob:example.org"
QUICK = python_target("print('shipped')")


def node(tmp_path, url, name):
    return on_backend(make_config(
        tmp_path / name, access={"allowed_users": [ALICE, BOB]}, worker={"name": name},
        targets={"deploy": {**QUICK, "approvals": 2}}), url)


async def test_a_remote_approval_reaches_the_node_showing_the_job(tmp_path, pg_url):
    a, b = App(node(tmp_path, pg_url, "a")), App(node(tmp_path, pg_url, "b"))
    await a.start()
    await b.start()
    try:
        watch = a.monitor.subscribe()
        job = await a.submit("deploy", caller=Caller.in_room(ALICE, Place("!r:example.org")))
        await asyncio.sleep(0.5)
        watch.take_all()
        await b.approve(job.id, Caller.in_room(BOB, Place("!r:example.org")))
        seen = []
        for _ in range(40):  # 4 s: far beyond LISTEN/NOTIFY's and the feed's delays
            await asyncio.sleep(0.1)
            seen += [e for e in watch.take_all() if e.id == job.id]
            if any(e.approval and e.approval.approved_by for e in seen):
                break
        stored = await a.status(job.id)
        assert stored.approval.approved_by == [BOB]   # the store has it
        assert any(e.approval and e.approval.approved_by == [BOB] for e in seen), \
            f"node A's monitor told nothing of the approval: {seen}"
    finally:
        await b.stop()
        await a.stop()

"""Concurrency groups on both store backends: at most one job of a group runs at a time
(the store's claim decides, not a process's memory), a waiting job says which one it waits
for, and a target's on_busy chooses between waiting, cancelling the older ones and refusing
the new one."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from conftest import on_backend
from fleet import api, free_port, node_config, python_command, start, wait_for
from helpers import final_state, make_config, python_target

from matrixjobs.app import App
from matrixjobs.audit import AuditQuery
from matrixjobs.config import Config
from matrixjobs.errors import BadArgumentsError, GroupBusyError
from matrixjobs.models import Status
from matrixjobs.policy import Caller, Place

ALICE = "@alice:example.org"
# Notes its own start and end (monotonic clock of this machine) in the file it is given.
TIMED = python_target("""
    import sys, time
    with open(sys.argv[2], "a") as notes:
        notes.write(f"start {sys.argv[1]} {time.monotonic()}\\n")
    time.sleep(0.6)
    with open(sys.argv[2], "a") as notes:
        notes.write(f"end {sys.argv[1]} {time.monotonic()}\\n")
""", concurrency="deploy-{0}", args_pattern=r"[a-z/._0-9-]+")


def config(tmp_path, url, **deploy):
    return on_backend(make_config(
        tmp_path, access={"allowed_users": [ALICE]}, queue={"workers": 4},
        targets={"deploy": {**TIMED, **deploy}}), url)


def person() -> Caller:
    return Caller.in_room(ALICE, Place("!ops:example.org"))


def spans(notes) -> dict[str, list[tuple[float, float]]]:
    """Each group's runs as (start, end), in order of start."""
    starts: dict[str, list[float]] = {}
    ends: dict[str, list[float]] = {}
    for line in notes.read_text().splitlines():
        kind, group, moment = line.split()
        (starts if kind == "start" else ends).setdefault(group, []).append(float(moment))
    return {group: sorted(zip(sorted(starts[group]), sorted(ends[group]), strict=True))
            for group in starts}


async def running(app, subject: str) -> None:
    for _ in range(200):
        if (await app.status(subject)).status is Status.PROCESSING:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{subject} never started")


async def test_one_job_of_a_group_runs_at_a_time_and_the_next_says_why_it_waits(
        tmp_path, database_url, running_app):
    app = await running_app(config(tmp_path, database_url))
    notes = tmp_path / "notes"
    first = await app.submit("deploy", ["prod", str(notes)], caller=person())
    await running(app, first.id)
    second = await app.submit("deploy", ["prod", str(notes)], caller=person())
    other = await app.submit("deploy", ["staging", str(notes)], caller=person())
    waiting = await app.status(second.id)
    assert (waiting.status, waiting.message) == (
        Status.PENDING, f"waiting: deploy-prod {first.id} is running")
    await running(app, other.id)  # another group does not wait
    for job in (first, second, other):
        assert (await final_state(app, job.id)).status is Status.COMPLETED
    runs = spans(notes)
    [(_, first_end), (second_start, _)] = runs["prod"]
    assert second_start >= first_end
    [(staging_start, _)] = runs["staging"]
    assert staging_start < first_end


async def test_a_list_of_waiting_jobs_reads_each_group_once(tmp_path, database_url,
                                                            running_app):
    app = await running_app(config(tmp_path, database_url))
    notes = tmp_path / "notes"
    first = await app.submit("deploy", ["prod", str(notes)], caller=person())
    await running(app, first.id)
    waiting = [await app.submit("deploy", ["prod", str(notes)], caller=person())
               for _ in range(5)]
    reads = []
    group_jobs = app.store.group_jobs

    async def counted(group: str):
        reads.append(group)
        return await group_jobs(group)
    app.store.group_jobs = counted
    listed = {event.id: event.message for event in await app.active()}
    assert {listed[job.id] for job in waiting} == {f"waiting: deploy-prod {first.id} is running"}
    assert reads == ["deploy-prod"]


async def test_skip_refuses_new_work_while_the_group_has_some(tmp_path, database_url,
                                                              running_app):
    app = await running_app(config(tmp_path, database_url, on_busy="skip"))
    notes = tmp_path / "notes"
    first = await app.submit("deploy", ["prod", str(notes)], caller=person())
    with pytest.raises(GroupBusyError, match=f"^deploy-prod is busy: {first.id} is "
                                             r"(queued|running); not started$"):
        await app.submit("deploy", ["prod", str(notes)], caller=person())
    await app.submit("deploy", ["staging", str(notes)], caller=person())
    [refused] = await app.audit(AuditQuery(action="refused"))
    assert (refused.actor, refused.target, json.loads(refused.detail)["rule"]) == (
        ALICE, "deploy", "concurrency")
    assert (await final_state(app, first.id)).status is Status.COMPLETED
    again = await app.submit("deploy", ["prod", str(notes)], caller=person())
    assert (await final_state(app, again.id)).status is Status.COMPLETED


async def test_cancel_older_cancels_the_running_and_queued_ones_and_records_why(
        tmp_path, database_url, running_app):
    app = await running_app(config(tmp_path, database_url, on_busy="cancel-older"))
    notes = tmp_path / "notes"
    first = await app.submit("deploy", ["prod", str(notes)], caller=person())
    await running(app, first.id)
    second = await app.submit("deploy", ["prod", str(notes)], caller=person())
    third = await app.submit("deploy", ["prod", str(notes)], caller=person())
    assert (await final_state(app, first.id)).status is Status.CANCELLED
    assert (await final_state(app, second.id)).status is Status.CANCELLED
    assert (await final_state(app, third.id)).status is Status.COMPLETED
    cancels = [record for record in await app.audit(AuditQuery(action="cancelled"))]
    assert {(r.subject, r.actor, json.loads(r.detail)["superseded_by"]) for r in cancels} >= {
        (first.id, ALICE, third.id), (second.id, ALICE, third.id)}


async def test_cancels_a_stop_left_undone_are_made_at_the_next_start(tmp_path, database_url,
                                                                      running_app):
    """The cancels follow the queueing in a task of their own: a stop between the two
    leaves the older job queued, and the next start cancels it."""
    notes = tmp_path / "notes"
    busy = config(tmp_path, database_url, on_busy="cancel-older")
    idle = busy.model_copy(update={"queue": busy.queue.model_copy(update={"workers": 0})})
    async with App(idle) as before:
        older = await before.submit("deploy", ["prod", str(notes)])
        before._supervisor.once = lambda *_: None  # stopped before its cancels ran
        newer = await before.submit("deploy", ["prod", str(notes)], caller=person())
    app = await running_app(busy)
    assert (await final_state(app, older.id)).status is Status.CANCELLED
    assert (await final_state(app, newer.id)).status is Status.COMPLETED
    [cancel] = await app.audit(AuditQuery(action="cancelled"))
    assert (cancel.subject, cancel.actor, json.loads(cancel.detail)) == (
        older.id, "service", {"superseded_by": newer.id})


async def test_a_group_named_by_an_argument_needs_that_argument(tmp_path, database_url,
                                                                running_app):
    app = await running_app(config(tmp_path, database_url))
    with pytest.raises(BadArgumentsError, match=r"deploy needs at least 1 argument\(s\): its "
                                                r"concurrency group is 'deploy-\{0\}'"):
        await app.submit("deploy", [], caller=person())


@pytest.mark.parametrize(("deploy", "message"), [
    ({"on_busy": "skip"}, 'on_busy = "skip" needs concurrency'),
    ({"concurrency": "deploy-{who}"}, r"may name only the job's arguments, as \{0\}"),
    ({"concurrency": "deploy-{0"}, "is not a group name template"),
    ({"concurrency": "d", "on_busy": "later"}, "on_busy"),
])
def test_a_group_is_checked_when_the_config_is_read(tmp_path, deploy, message):
    with pytest.raises(ValueError, match=message):
        Config.model_validate({"targets": {"deploy": {"command": ["true"], **deploy}}})


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_four_workers_on_one_postgresql_never_overlap_two_jobs_of_a_group(tmp_path, pg_url):
    notes = tmp_path / "notes"
    port = free_port()
    targets = {"grouped": {"command": python_command(f"""
        import sys, time
        with open({str(notes)!r}, "a") as out:
            out.write(f"start g{{sys.argv[1]}} {{time.monotonic()}}\\n")
        time.sleep(0.03)
        with open({str(notes)!r}, "a") as out:
            out.write(f"end g{{sys.argv[1]}} {{time.monotonic()}}\\n")
    """), "concurrency": "g{0}", "args_pattern": "[0-9]"}, "free": {"command": ["true"]}}
    node = start(tmp_path / "node", node_config(tmp_path / "node", pg_url, targets, workers=0,
                                                api_port=port), "run", "node")
    workers = [start(tmp_path / f"w{n}", node_config(tmp_path / f"w{n}", pg_url, targets,
                                                     name=f"w{n}", workers=3), "worker", f"w{n}")
               for n in range(4)]
    try:
        ids = [api(port, "POST", "/v1/jobs", {"target": "grouped", "args": [str(n % 5)]})["id"]
               for n in range(200)]
        free = [api(port, "POST", "/v1/jobs", {"target": "free"})["id"] for _ in range(50)]
        wait_for(lambda: all(api(port, "GET", f"/v1/jobs/{job}")["status"] == "completed"
                             for job in [*ids, *free]), 180, "every job completed")
    finally:
        for worker in workers:
            worker.stop()
        node.stop()
    runs = spans(notes)
    assert sorted(runs) == [f"g{n}" for n in range(5)]
    for group, group_runs in runs.items():
        assert len(group_runs) == 40, group
        for (_, end), (start_next, _) in itertools.pairwise(group_runs):
            assert start_next >= end, (group, end, start_next)
    # The groups did run side by side: some two runs of different groups overlap.
    everything = sorted(span for group_runs in runs.values() for span in group_runs)
    assert any(start_next < end for (_, end), (start_next, _) in itertools.pairwise(everything))

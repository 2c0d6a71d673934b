"""Schedules through App on both store backends: the loop's steps on a clock the test
moves (a slot once across nodes, missed = latest / skip, pause and resume with their audit
records, a store outage), and a real loop on a schedule every second."""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3

import psycopg
import pytest
from conftest import on_backend
from helpers import make_config, python_target

from matrixjobs import scheduler as scheduler_module
from matrixjobs.app import App
from matrixjobs.audit import AuditQuery
from matrixjobs.errors import ForbiddenError, NotFoundError
from matrixjobs.models import Job, Status
from matrixjobs.policy import ADMIN, Caller, Place, Via
from matrixjobs.scheduler import Scheduler

ALICE, BOB = "@alice:example.org", "@bob:example.org"
QUICK = python_target("print('built')")
MINUTE = 60.0
T0 = 1_800_000_000.0  # a whole minute (2027-01-15T08:00:00Z)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def config(tmp_path, url, **schedules):
    return on_backend(make_config(
        tmp_path, access={"allowed_users": [ALICE]},
        targets={"docs": QUICK, "deploy": {**QUICK, "allowed_users": [BOB]}},
        schedules=schedules), url)


@pytest.fixture
def quiet_app(running_app):
    """Factory: a running App on the test's clock whose schedules only the test's own
    nodes run, a step when the test says."""

    async def start(config, clock: Clock) -> App:
        app = App(config, clock=clock)
        app.scheduler = None
        return await running_app(app)

    return start


def node(app: App, clock: Clock, **schedules) -> Scheduler:
    """A scheduler of its own, as another node sharing the store would run it."""
    configured = make_config(app.config.store.path.parent, targets=app.config.targets,
                             schedules=schedules).schedules
    return Scheduler(configured, app.store, app.trigger, clock=clock)


EVERY_MINUTE = {"cron": "* * * * *", "target": "docs"}


async def scheduled_jobs(app: App, name: str = "tick") -> list[Job]:
    return [job for job in await app.jobs() if job.requester == f"schedule:{name}"]


async def test_a_new_schedule_starts_nothing_for_slots_before_it_was_seen(tmp_path,
                                                                         database_url,
                                                                         quiet_app):
    clock = Clock(T0 + 5)
    app = await quiet_app(config(tmp_path, database_url), clock)
    await node(app, clock, tick=EVERY_MINUTE).step()
    assert await scheduled_jobs(app) == []
    clock.now = T0 + MINUTE + 0.01
    await node(app, clock, tick=EVERY_MINUTE).step()
    [job] = await scheduled_jobs(app)
    assert job.trigger is not None and job.trigger.slot == T0 + MINUTE
    assert job.data["target"] == "docs"


async def test_three_nodes_racing_for_each_slot_start_one_job_per_slot(tmp_path, database_url,
                                                                        quiet_app):
    clock = Clock(T0)
    app = await quiet_app(config(tmp_path, database_url), clock)
    nodes = [node(app, clock, tick=EVERY_MINUTE) for _ in range(3)]
    await nodes[0].step()
    for minute in range(1, 4):
        clock.now = T0 + minute * MINUTE + 0.2
        await asyncio.gather(*(each.step() for each in nodes))
    jobs = await scheduled_jobs(app)
    assert sorted(job.trigger.slot for job in jobs) == [T0 + m * MINUTE for m in (1, 2, 3)]
    [state] = await app.store.schedule_states()
    assert (state.last_slot, state.last_job) == (T0 + 3 * MINUTE, jobs[0].id)


async def test_missed_latest_starts_the_latest_missed_slot_once_after_a_gap(tmp_path,
                                                                           database_url,
                                                                           quiet_app):
    clock = Clock(T0)
    app = await quiet_app(config(tmp_path, database_url), clock)
    await node(app, clock, tick=EVERY_MINUTE).step()
    clock.now = T0 + 10 * MINUTE + 40  # no node ran for ten slots
    await node(app, clock, tick=EVERY_MINUTE).step()
    [job] = await scheduled_jobs(app)
    assert job.trigger.slot == T0 + 10 * MINUTE


async def test_missed_skip_starts_nothing_after_a_gap_and_goes_on_at_the_next_slot(
        tmp_path, database_url, quiet_app):
    clock = Clock(T0)
    app = await quiet_app(config(tmp_path, database_url), clock)
    skipping = {**EVERY_MINUTE, "missed": "skip"}
    await node(app, clock, tick=skipping).step()
    clock.now = T0 + 10 * MINUTE + 40
    restarted = node(app, clock, tick=skipping)
    await restarted.step()
    assert await scheduled_jobs(app) == []
    clock.now = T0 + 11 * MINUTE + 0.5
    await restarted.step()
    [job] = await scheduled_jobs(app)
    assert job.trigger.slot == T0 + 11 * MINUTE


HOUR = 60 * MINUTE


async def test_a_changed_cron_starts_afresh_at_restart_without_a_missed_run(
        tmp_path, database_url, quiet_app, caplog):
    """The operator's trial: 30 2 * * * becomes 0 3 * * *, restarted at 14:00. Today's
    03:00 was never a slot of the schedule as it ran: nothing was missed."""
    clock = Clock(T0)  # 08:00 UTC
    app = await quiet_app(config(tmp_path, database_url), clock)
    await node(app, clock, nightly={"cron": "30 2 * * *", "target": "docs"}).step()
    clock.now = T0 + 6 * HOUR  # 14:00
    changed = {"cron": "0 3 * * *", "target": "docs"}
    restarted = node(app, clock, nightly=changed)
    with caplog.at_level(logging.INFO, "matrixjobs.scheduler"):
        await restarted.step()
    assert await scheduled_jobs(app, "nightly") == []
    [said] = [r.getMessage() for r in caplog.records if "changed" in r.getMessage()]
    assert "'30 2 * * * UTC' to '0 3 * * * UTC'" in said
    clock.now = T0 + 19 * HOUR + 0.1  # tomorrow's 03:00
    await restarted.step()
    [job] = await scheduled_jobs(app, "nightly")
    assert job.trigger.slot == T0 + 19 * HOUR
    [state] = await app.store.schedule_states()
    assert (state.cron, state.timezone) == ("0 3 * * *", "UTC")


async def test_a_changed_time_zone_starts_afresh_too_and_an_unchanged_one_runs_the_missed(
        tmp_path, database_url, quiet_app):
    clock = Clock(T0)
    app = await quiet_app(config(tmp_path, database_url), clock)
    await node(app, clock, nightly={"cron": "0 3 * * *", "target": "docs"}).step()
    clock.now = T0 + 25 * HOUR  # tomorrow 09:00 UTC: its 03:00 was missed
    berlin = {"cron": "0 3 * * *", "timezone": "Europe/Berlin", "target": "docs"}
    await node(app, clock, nightly=berlin).step()
    assert await scheduled_jobs(app, "nightly") == []
    clock.now += 24 * HOUR  # unchanged since: the day's 03:00 Berlin was missed, runs once
    await node(app, clock, nightly=berlin).step()
    [job] = await scheduled_jobs(app, "nightly")
    assert job.trigger.slot == T0 + 42 * HOUR  # 03:00 CET = 02:00 UTC, two days on


async def test_a_schedule_recorded_before_its_cron_was_kept_runs_its_missed_slot(
        tmp_path, database_url, quiet_app):
    """A row an older matrixjobs wrote says nothing of its cron: it is taken as unchanged
    (as before), not as changed."""
    clock = Clock(T0)
    app = await quiet_app(config(tmp_path, database_url), clock)
    await app.store.schedule_done("tick", T0, None)  # as the older version recorded it
    clock.now = T0 + 10 * MINUTE + 40
    await node(app, clock, tick=EVERY_MINUTE).step()
    [job] = await scheduled_jobs(app)
    assert job.trigger.slot == T0 + 10 * MINUTE
    [state] = await app.store.schedule_states()
    assert state.cron == "* * * * *"


async def test_a_paused_schedule_starts_nothing_and_its_resume_runs_no_held_slot(
        tmp_path, database_url, quiet_app):
    clock = Clock(T0)
    app = await quiet_app(config(tmp_path, database_url, tick=EVERY_MINUTE), clock)
    loop = node(app, clock, tick=EVERY_MINUTE)
    await loop.step()
    paused = await app.pause_schedule("tick", Caller(ALICE, Via.API))
    assert (paused.paused, paused.paused_by, paused.next_run) == (True, ALICE, None)
    clock.now = T0 + 3 * MINUTE + 40
    await loop.step()
    assert await scheduled_jobs(app) == []
    resumed = await app.resume_schedule("tick", Caller(ALICE, Via.API))
    assert not resumed.paused and resumed.next_run is not None
    await node(app, clock, tick=EVERY_MINUTE).step()  # a node starting now: nothing held
    assert await scheduled_jobs(app) == []
    records = await app.audit(AuditQuery(user=ALICE))
    assert [(r.action, r.target, r.detail) for r in records] == [
        ("schedule_paused", "docs", '{"schedule":"tick"}'),
        ("schedule_resumed", "docs", '{"schedule":"tick"}')]


@pytest.mark.parametrize("batch", [False, True])
async def test_a_pause_committed_after_the_loops_read_still_stops_the_slot(
        tmp_path, database_url, quiet_app, monkeypatch, batch):
    """The race docs/schedules.md once owned to: the loop read the schedule running, a
    pause committed, then the loop fired. The slot's own transaction reads the pause."""
    clock = Clock(T0)
    tick = {"cron": "* * * * *", **({"batch": ["docs"]} if batch else {"target": "docs"})}
    app = await quiet_app(config(tmp_path, database_url, tick=tick), clock)
    loop = node(app, clock, tick=tick)
    await loop.step()
    read, seen = app.store.schedule_states, []

    async def read_then_paused():
        seen.extend(await read())
        monkeypatch.setattr(app.store, "schedule_states", read)  # the pause reads too
        await app.pause_schedule("tick", Caller(ALICE, Via.API))  # after the loop's read
        return seen

    monkeypatch.setattr(app.store, "schedule_states", read_then_paused)
    clock.now = T0 + MINUTE + 0.1
    await loop.step()
    assert [state.paused for state in seen] == [False]  # what the loop acted on
    assert await scheduled_jobs(app) == [] and await app.batches() == []
    [state] = await read()
    assert (state.paused_by, state.last_job) == (ALICE, None)


async def test_a_slot_waits_for_a_pause_under_way_on_postgresql_and_then_starts_nothing(
        tmp_path, pg_url, quiet_app):
    """Another node's pause not yet committed when the slot's transaction reads the
    schedule: the read waits for it (the row is locked), then sees it."""
    clock = Clock(T0)
    app = await quiet_app(config(tmp_path, pg_url, tick=EVERY_MINUTE), clock)
    loop = node(app, clock, tick=EVERY_MINUTE)
    await loop.step()
    async with await psycopg.AsyncConnection.connect(pg_url) as other:
        await other.execute("UPDATE schedules SET paused_by = %s, paused_at = %s "
                            "WHERE name = 'tick'", (BOB, T0 + MINUTE))
        clock.now = T0 + MINUTE + 0.1
        step = asyncio.create_task(loop.step())
        await asyncio.sleep(0.5)
        assert not step.done()  # waiting for the pause's transaction
        await other.commit()
        await asyncio.wait_for(step, 10)
    assert await scheduled_jobs(app) == []
    [state] = await app.store.schedule_states()
    assert (state.paused_by, state.last_job) == (BOB, None)


async def test_pausing_twice_records_once_and_resuming_what_runs_records_nothing(
        tmp_path, database_url, quiet_app):
    app = await quiet_app(config(tmp_path, database_url, tick=EVERY_MINUTE), Clock(T0))
    await app.resume_schedule("tick", Caller(ADMIN, Via.CLI))
    await app.pause_schedule("tick", Caller(ADMIN, Via.CLI))
    again = await app.pause_schedule("tick", Caller(ALICE, Via.API))
    assert again.paused_by == ADMIN
    records = await app.audit(AuditQuery(action="schedule_paused"))
    assert [(r.actor, r.via) for r in records] == [(ADMIN, "cli")]
    assert await app.audit(AuditQuery(action="schedule_resumed")) == []


async def test_pausing_needs_the_right_to_run_what_it_starts(tmp_path, quiet_app):
    app = await quiet_app(config(tmp_path, None, ship={"cron": "0 3 * * *",
                                                       "target": "deploy"}), Clock(T0))
    with pytest.raises(ForbiddenError, match="you may not run deploy"):
        await app.pause_schedule("ship", Caller.in_room(ALICE, Place("!ops:example.org")))
    [refused] = await app.audit(AuditQuery(action="refused"))
    assert refused.actor == ALICE and '"action":"schedule"' in refused.detail
    assert (await app.pause_schedule("ship", Caller(BOB, Via.API))).paused
    with pytest.raises(NotFoundError, match="no schedule 'shipp' \\(configured: ship\\)"):
        await app.resume_schedule("shipp", Caller(BOB, Via.API))


async def test_the_list_shows_next_run_in_its_zone_and_the_last_jobs_outcome(
        tmp_path, quiet_app):
    berlin = {"cron": "30 2 * * *", "timezone": "Europe/Berlin", "batch": ["docs"],
              "room": "#ci:example.org"}
    clock = Clock(T0)
    app = await quiet_app(config(tmp_path, None, nightly=berlin), clock)
    [info] = await app.schedules()
    assert (info.name, info.batch, info.room, info.last_job, info.last_status) == (
        "nightly", ["docs"], "#ci:example.org", None, None)
    assert info.next_run is not None
    assert info.next_run.isoformat() == "2027-01-16T02:30:00+01:00"
    loop = node(app, clock, nightly=berlin)
    await loop.step()
    clock.now = loop.next_slot() + 0.1
    await loop.step()
    [info] = await app.schedules()
    assert info.last_job is not None and info.last_job.startswith("b")
    assert info.last_run is not None and info.last_run.isoformat().endswith("02:30:00+01:00")
    for _ in range(200):
        [info] = await app.schedules()
        if info.last_status is Status.COMPLETED:
            break
        await asyncio.sleep(0.05)
    assert info.last_status is Status.COMPLETED


async def test_a_store_outage_does_not_end_the_loop_and_the_missed_slot_follows_missed(
        tmp_path, quiet_app, monkeypatch, caplog):
    clock = Clock(T0)
    app = await quiet_app(config(tmp_path, None), clock)
    monkeypatch.setattr(scheduler_module, "RETRY_S", 0.05)
    loop = node(app, clock, tick=EVERY_MINUTE)
    await loop.step()
    real, failures = app.store.schedule_states, []

    async def unavailable():
        if len(failures) < 5:
            failures.append(clock.now)
            clock.now += 20  # the outage lasts past the slot's LATE_S
            raise sqlite3.OperationalError("disk I/O error")
        return await real()

    monkeypatch.setattr(app.store, "schedule_states", unavailable)
    clock.now = T0 + MINUTE + 0.1
    with caplog.at_level(logging.WARNING, "matrixjobs.scheduler"):
        task = asyncio.create_task(loop.run())
        for _ in range(100):
            if await scheduled_jobs(app):
                break
            await asyncio.sleep(0.05)
        task.cancel()
    [job] = await scheduled_jobs(app)
    assert job.trigger.slot == T0 + 2 * MINUTE  # the latest slot when the store was back
    assert len(failures) == 5
    said = [r for r in caplog.records if "a step failed" in r.getMessage()]
    assert len(said) == 1  # once per outage, not once per try


async def test_a_running_service_starts_a_schedule_every_second_on_its_own(tmp_path,
                                                                          running_app):
    app = await running_app(config(tmp_path, None, tick={"cron": "* * * * * *",
                                                         "target": "docs"}))
    for _ in range(100):
        if len(await scheduled_jobs(app)) >= 3:
            break
        await asyncio.sleep(0.05)
    jobs = await scheduled_jobs(app)
    slots = sorted(job.trigger.slot for job in jobs)
    assert len(slots) >= 3 and len(set(slots)) == len(slots)
    assert all(later - earlier == 1 for earlier, later in itertools.pairwise(slots))

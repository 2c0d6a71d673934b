"""Work that no person asked for: App.trigger on both store backends. A webhook delivery or
a schedule slot starts a configured target (or batch) whose requester, event and audit
record say what started it; the same delivery twice starts it once; approvals still hold."""

from __future__ import annotations

import json

import pytest
from conftest import on_backend
from helpers import final_state, make_config, python_target

from matrixjobs.audit import AuditQuery
from matrixjobs.errors import AlreadySubmittedError, BadArgumentsError, UnknownTargetError
from matrixjobs.matrix.render import render_progress
from matrixjobs.models import HELD_UNTIL, Batch, Job, Status, Trigger, TriggerKind
from matrixjobs.policy import Caller, Place
from matrixjobs.progress.events import TriggerInfo
from matrixjobs.progress.wording import started_by

ALICE, BOB = "@alice:example.org", "@bob:example.org"
PUSH = Trigger(TriggerKind.WEBHOOK, "site", event="push", ref="refs/heads/main",
               branch="main", sha="3f2c1ab9d0e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4", pusher="alice",
               repo="team/site")
NIGHTLY = Trigger(TriggerKind.SCHEDULE, "nightly", slot=1_796_007_600.0)


def config(tmp_path, url):
    return on_backend(make_config(
        tmp_path, access={"allowed_users": [ALICE]},
        targets={"deploy": {**python_target("import sys; print('deploying', sys.argv[1:])"),
                            "args_pattern": r"[a-z/]+", "allowed_users": [BOB]},
                 "docs": python_target("print('docs')"),
                 "held": {**python_target("print('x')"), "approvals": 1}}), url)


async def test_a_webhook_starts_its_target_as_itself_and_the_audit_log_says_so(
        tmp_path, database_url, running_app):
    app = await running_app(config(tmp_path, database_url))
    # allowed_users names only Bob: who-may rules guard people, not what the operator wired.
    job = await app.trigger(PUSH, target="deploy", args=["main"], room="#ci:example.org",
                            dedupe_key="webhook:site:d1")
    assert isinstance(job, Job)
    assert (job.requester, job.trigger) == ("webhook:site", PUSH)
    done = await final_state(app, job.id)
    assert done.status is Status.COMPLETED
    assert done.trigger == TriggerInfo(webhook="site", event="push", ref="refs/heads/main",
                                       branch="main", sha=PUSH.sha, pusher="alice",
                                       repo="team/site")
    assert '"trigger":{"webhook":"site","event":"push"' in done.to_json()
    [record] = await app.audit(AuditQuery(user="webhook:site"))
    assert (record.action, record.via, record.subject, record.target) == (
        "started", "webhook", job.id, "deploy")
    assert json.loads(record.detail) == {"args": ["main"], "ref": "refs/heads/main",
                                         "sha": PUSH.sha}
    [unsent] = await app.unsent_messages()
    assert (unsent.subject_id, unsent.room_id, unsent.event_id, unsent.reply_to) == (
        job.id, "#ci:example.org", None, "")


async def test_the_same_delivery_twice_starts_one_job(tmp_path, database_url, running_app):
    app = await running_app(config(tmp_path, database_url))
    job = await app.trigger(PUSH, target="docs", dedupe_key="webhook:site:d2")
    with pytest.raises(AlreadySubmittedError) as again:
        await app.trigger(PUSH, target="docs", dedupe_key="webhook:site:d2")
    assert again.value.subject_id == job.id
    assert len(await app.jobs(limit=10)) == 1


async def test_a_schedule_starts_a_batch_whose_operations_say_so(tmp_path, database_url,
                                                                  running_app):
    app = await running_app(config(tmp_path, database_url))
    batch = await app.trigger(NIGHTLY, batch=["docs", "docs"], dedupe_key="schedule:n:1")
    assert isinstance(batch, Batch)
    assert (batch.requester, batch.trigger) == ("schedule:nightly", NIGHTLY)
    done = await final_state(app, batch.id)
    assert done.status is Status.COMPLETED
    assert done.trigger is not None and done.trigger.schedule == "nightly"
    for job in await app.jobs(limit=10):
        assert (job.requester, job.trigger) == ("schedule:nightly", NIGHTLY)


async def test_approvals_hold_triggered_work_and_anyone_allowed_may_approve(
        tmp_path, database_url, running_app):
    app = await running_app(config(tmp_path, database_url))
    job = await app.trigger(PUSH, target="held")
    assert job.run_after == HELD_UNTIL
    await app.approve(job.id, Caller.in_room(ALICE, Place("!ops:example.org")))
    assert (await final_state(app, job.id)).status is Status.COMPLETED


async def test_what_a_trigger_names_is_checked_like_any_request(tmp_path, database_url,
                                                                running_app):
    app = await running_app(config(tmp_path, database_url))
    with pytest.raises(UnknownTargetError):
        await app.trigger(PUSH, target="nope")
    with pytest.raises(BadArgumentsError):
        await app.trigger(PUSH, target="deploy", args=["main; rm -rf /"])
    assert await app.jobs(limit=10) == []


def test_the_room_message_says_what_started_it():
    assert started_by(TriggerInfo(webhook="site", event="push", branch="main", pusher="alice",
                                  sha=PUSH.sha)) == "🪝 push to main by alice (3f2c1ab)"
    assert started_by(TriggerInfo(webhook="site", event="push", tag="v1.2",
                                  sha=PUSH.sha)) == "🪝 tag v1.2 (3f2c1ab)"
    assert started_by(TriggerInfo(webhook="site", event="push", branch="b" * 100)).endswith(
        "b…")
    assert started_by(TriggerInfo(schedule="nightly", slot="2026-12-07T02:00:00Z")) == (
        "⏰ nightly: the 02:00 UTC run")
    assert started_by(TriggerInfo(schedule="nightly", slot="2026-12-07T02:00:00Z",
                                  timezone="Europe/Berlin")) == (
        "⏰ nightly: the 03:00 Europe/Berlin run")


async def test_the_progress_message_carries_the_line(tmp_path, database_url, running_app):
    app = await running_app(config(tmp_path, database_url))
    job = await app.trigger(PUSH, target="docs")
    rendered = render_progress(await app.status(job.id), 0.0)
    assert rendered.body.splitlines()[1] == "🪝 push to main by alice (3f2c1ab)"

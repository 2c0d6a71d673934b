"""Work held for approval, through App on both store backends: held until enough others
approve, refused by one denial, cancelled when the approval expires, never run unapproved
across a restart."""

from __future__ import annotations

import asyncio

import pytest
from conftest import on_backend
from helpers import final_state, make_config, python_target

from matrixjobs.app import App
from matrixjobs.errors import BadBatchError, ForbiddenError, NotAwaitingApprovalError
from matrixjobs.mcp.backend import MCP_ADMIN
from matrixjobs.models import HELD_UNTIL, Status
from matrixjobs.policy import ADMIN, Caller, Place, Via

ALICE, BOB, CAROL, DAVE = ("@alice:example.org", "@bob:example.org", "@carol:example.org",
                           "@dave:example.org")
ROOM = Place("!ops:example.org")
QUICK = python_target("print('shipped')")


def config(tmp_path, url, **deploy):
    return on_backend(make_config(
        tmp_path, access={"allowed_users": [ALICE, BOB, CAROL, DAVE]},
        targets={"deploy": {**QUICK, "approvals": 1, **deploy}, "quick": QUICK}), url)


def person(user: str) -> Caller:
    return Caller.in_room(user, ROOM)


async def held_for(app: App, subject: str, seconds: float = 0.5) -> None:
    """`subject` stays pending for `seconds` (it is not run)."""
    await asyncio.sleep(seconds)
    event = await app.status(subject)
    assert event.status is Status.PENDING, event


async def test_a_job_waits_for_another_persons_approval_then_runs(tmp_path, database_url,
                                                                  running_app):
    app = await running_app(config(tmp_path, database_url))
    job = await app.submit("deploy", caller=person(ALICE))
    assert job.run_after == HELD_UNTIL
    await held_for(app, job.id)
    event = await app.status(job.id)
    assert event.approval is not None
    assert (event.approval.required, event.approval.approved_by) == (1, [])
    # The requester's own approval never counts.
    with pytest.raises(ForbiddenError, match="your own approval does not count"):
        await app.approve(job.id, person(ALICE))
    await held_for(app, job.id, 0.2)
    await app.approve(job.id, person(BOB))
    done = await final_state(app, job.id)
    assert done.status is Status.COMPLETED
    assert done.approval is not None and done.approval.approved_by == [BOB]
    with pytest.raises(NotAwaitingApprovalError, match="already approved by @bob"):
        await app.approve(job.id, person(CAROL))


async def test_each_person_counts_once(tmp_path, database_url, running_app):
    app = await running_app(config(tmp_path, database_url, approvals=2))
    job = await app.submit("deploy", caller=person(ALICE))
    await app.approve(job.id, person(BOB))
    await app.approve(job.id, person(BOB))
    await held_for(app, job.id)
    assert (await app.status(job.id)).approval.approved_by == [BOB]  # type: ignore[union-attr]
    await app.approve(job.id, person(CAROL))
    assert (await final_state(app, job.id)).status is Status.COMPLETED


async def test_one_denial_cancels_it_and_says_who_and_why(tmp_path, database_url, running_app):
    app = await running_app(config(tmp_path, database_url, approvals=2))
    job = await app.submit("deploy", caller=person(ALICE))
    await app.approve(job.id, person(BOB))
    denied = await app.deny(job.id, person(CAROL), "  not on a Friday\x1b[31m  ")
    assert denied.status is Status.CANCELLED
    event = await app.status(job.id)
    assert event.approval is not None
    assert (event.approval.denied_by, event.approval.reason) == (CAROL, "not on a Friday[31m")
    with pytest.raises(NotAwaitingApprovalError, match="already denied by @carol"):
        await app.approve(job.id, person(DAVE))


async def test_an_unapproved_job_expires_and_is_cancelled(tmp_path, database_url, running_app):
    app = await running_app(config(tmp_path, database_url, approval_timeout_s=0.3))
    job = await app.submit("deploy", caller=person(ALICE))
    await asyncio.sleep(0.4)
    await app.end_approvals()
    event = await app.status(job.id)
    assert event.status is Status.CANCELLED
    assert event.approval is not None and event.approval.expired


async def test_a_batch_with_such_a_target_waits_as_a_whole(tmp_path, database_url, running_app):
    app = await running_app(config(tmp_path, database_url))
    batch = await app.submit_batch(["quick", "deploy", "quick"], caller=person(ALICE))
    await held_for(app, batch.id)
    assert all(job.status is Status.PENDING for job in await app.jobs())
    await app.approve(batch.id, person(BOB))
    assert (await final_state(app, batch.id)).status is Status.COMPLETED


async def test_approvers_decide_and_a_rerun_needs_approval_again(tmp_path, running_app):
    app = await running_app(config(tmp_path, None, approvers=["@carol:*"]))
    job = await app.submit("deploy", caller=person(ALICE))
    with pytest.raises(ForbiddenError, match="you may not approve deploy"):
        await app.approve(job.id, person(BOB))
    with pytest.raises(ForbiddenError, match="you may not approve deploy"):
        await app.deny(job.id, person(BOB))
    await app.approve(job.id, person(CAROL))
    await final_state(app, job.id)
    again = await app.rerun(job.id, person(BOB))
    await held_for(app, again.id)
    await app.approve(again.id, Caller(ADMIN, Via.API))  # the service token may
    assert (await final_state(app, again.id)).status is Status.COMPLETED


async def test_a_restart_keeps_held_work_held_and_its_approvals(tmp_path, database_url):
    settings = config(tmp_path, database_url, approvals=2)
    async with App(settings) as app:
        job = await app.submit("deploy", caller=person(ALICE))
        await app.approve(job.id, person(BOB))
    async with App(settings) as app:
        await held_for(app, job.id)
        event = await app.status(job.id)
        assert event.approval is not None and event.approval.approved_by == [BOB]
        await app.approve(job.id, person(CAROL))
        assert (await final_state(app, job.id)).status is Status.COMPLETED


async def test_a_denial_a_crash_cut_short_is_finished_by_the_sweep(tmp_path, database_url,
                                                                    running_app):
    app = await running_app(config(tmp_path, database_url))
    job = await app.submit("deploy", caller=person(ALICE))
    assert job.approval is not None
    # Denied in the store, and the service died before it cancelled the job.
    assert await app.store.set_approval(job.id, job.approval, job.approval.denied(BOB, None),
                                        None)
    await held_for(app, job.id)
    await app.end_approvals()
    assert (await app.status(job.id)).status is Status.CANCELLED


# -- found by the review of #19 ------------------------------------------------------------------


async def test_the_service_token_cannot_approve_what_it_asked_for(tmp_path, running_app):
    """An MCP agent (or an API script) submits a held deploy: it may not approve it."""
    app = await running_app(config(tmp_path, None))
    job = await app.submit("deploy", caller=MCP_ADMIN)
    for token in (MCP_ADMIN, Caller(ADMIN, Via.API), Caller(ADMIN, Via.CLI)):
        with pytest.raises(ForbiddenError, match="your own approval does not count"):
            await app.approve(job.id, token)


async def test_an_approver_who_changes_their_mind_is_recorded_as_denying(tmp_path,
                                                                          running_app):
    app = await running_app(config(tmp_path, None, approvals=2))
    job = await app.submit("deploy", caller=person(ALICE))
    await app.approve(job.id, person(BOB))
    denied = await app.deny(job.id, person(BOB), "changed my mind")
    assert denied.status is Status.CANCELLED
    event = await app.status(job.id)
    assert event.approval is not None
    assert (event.approval.denied_by, event.approval.reason) == (BOB, "changed my mind")


async def test_an_expired_approval_cannot_be_granted_before_the_sweep_marks_it(
        tmp_path, running_app):
    app = await running_app(config(tmp_path, None, approval_timeout_s=0.2))
    job = await app.submit("deploy", caller=person(ALICE))
    await asyncio.sleep(0.4)
    with pytest.raises(NotAwaitingApprovalError, match="already approval expired"):
        await app.approve(job.id, person(BOB))


async def test_what_expired_while_the_service_was_down_is_cancelled_at_start(tmp_path):
    settings = config(tmp_path, None, approval_timeout_s=0.3)
    async with App(settings) as app:
        job = await app.submit("deploy", caller=person(ALICE))
    await asyncio.sleep(0.4)
    async with App(settings) as app:
        event = await app.status(job.id)
        assert event.status is Status.CANCELLED
        assert event.approval is not None and event.approval.expired


async def test_a_rule_dropped_later_lets_no_stranger_release_held_work(tmp_path):
    """Held with approvers = [@carol]; then the operator drops `approvals`: releasing what
    is still held takes the right to run it (Dave never had that)."""
    first = config(tmp_path, None, approvers=[CAROL], allowed_users=[ALICE])
    async with App(first) as app:
        job = await app.submit("deploy", caller=person(ALICE))
    async with App(config(tmp_path, None, allowed_users=[ALICE], approvals=0)) as app:
        assert (await app.status(job.id)).status is Status.PENDING
        with pytest.raises(ForbiddenError, match="only those who may run it may"):
            await app.approve(job.id, person(DAVE))


async def test_a_batch_whose_targets_ask_different_people_is_refused(tmp_path, running_app):
    app = await running_app(make_config(
        tmp_path, access={"allowed_users": [ALICE]},
        targets={"deploy": {**QUICK, "approvals": 1, "approvers": [DAVE]},
                 "migrate": {**QUICK, "approvals": 1, "approvers": [CAROL]},
                 "quick": QUICK}))
    with pytest.raises(BadBatchError, match="ask different people for approval"):
        await app.submit_batch(["migrate", "deploy"], caller=person(ALICE))
    await app.submit_batch(["quick", "deploy"], caller=person(ALICE))  # one set of people


async def test_the_api_denies_without_a_body_and_refuses_the_tokens_own(api_service):
    app, client = await api_service(token="approvals-token", targets={
        "deploy": {**QUICK, "approvals": 1}}, access={"allowed_users": [ALICE]})
    mine = (await client.post("/v1/jobs", json={"target": "deploy"})).json()
    refused = await client.post(f"/v1/jobs/{mine['id']}/approve")
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "forbidden")
    theirs = await app.submit("deploy", caller=person(ALICE))
    denied = await client.post(f"/v1/jobs/{theirs.id}/deny")
    assert denied.status_code == 200, denied.text
    assert denied.json()["approval"]["deniedBy"] == "admin"

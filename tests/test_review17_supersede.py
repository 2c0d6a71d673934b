"""Review of #17: cancel-older and approvals. A job held for approval has not been allowed
to run yet: queuing it must not cancel the group's running job (anyone who may merely ask
for a deploy could stop everyone else's)."""

from __future__ import annotations

import asyncio

from conftest import on_backend
from helpers import final_state, make_config, python_target

from matrixjobs.app import App
from matrixjobs.models import Job, Status
from matrixjobs.policy import Caller, Place

ALICE, BOB, CAROL = "@alice:example.org", "@bob:example.org", "@carol:example.org"
SLOW = python_target("import time; time.sleep(1.5); print('shipped')",
                     concurrency="deploy", on_busy="cancel-older")


def person(user: str) -> Caller:
    return Caller.in_room(user, Place("!ops:example.org"))


async def running_deploy(tmp_path, running_app) -> tuple[App, Job]:
    """A service whose deploys need one approval, and Alice's deploy, approved by Bob,
    running."""
    app = await running_app(on_backend(make_config(
        tmp_path, access={"allowed_users": [ALICE, BOB, CAROL]},
        targets={"deploy": {**SLOW, "approvals": 1}}), None))
    first = await app.submit("deploy", caller=person(ALICE))
    await app.approve(first.id, person(BOB))
    for _ in range(200):
        if (await app.status(first.id)).status is Status.PROCESSING:
            break
        await asyncio.sleep(0.02)
    return app, first


async def test_a_job_held_for_approval_does_not_cancel_the_running_one(tmp_path,
                                                                       running_app):
    app, first = await running_deploy(tmp_path, running_app)
    held = await app.submit("deploy", caller=person(CAROL))  # nobody approved it (yet)
    await asyncio.sleep(0.3)
    assert (await app.status(held.id)).status is Status.PENDING
    assert (await final_state(app, first.id)).status is Status.COMPLETED


async def test_approving_the_held_job_then_cancels_the_older_one(tmp_path, running_app):
    app, first = await running_deploy(tmp_path, running_app)
    held = await app.submit("deploy", caller=person(CAROL))
    await app.approve(held.id, person(BOB))
    assert (await final_state(app, first.id)).status is Status.CANCELLED
    assert (await final_state(app, held.id)).status is Status.COMPLETED

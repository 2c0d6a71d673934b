"""Running a job or batch again (App.rerun), and how the last run of the same work ended."""

from __future__ import annotations

import pytest
from helpers import final_state, make_config, python_target

from matrixjobs.app import App
from matrixjobs.errors import (
    AlreadySubmittedError,
    BadArgumentsError,
    NotFoundError,
    TargetGoneError,
)
from matrixjobs.models import Status
from matrixjobs.policy import ADMIN, Caller, Place, Via

ECHO = python_target("import sys; print('::progress 1/1', *sys.argv[1:])",
                     args_pattern="[a-z]{1,8}")
OK = python_target("print('::progress 1/1 ok')")
SLOW = python_target("import time; time.sleep(30)")


def flaky(marker) -> dict:
    """Fails while `marker` exists."""
    return python_target(f"import os, sys; sys.exit(3 if os.path.exists({str(marker)!r}) else 0)",
                         max_retries=0)


def config(tmp_path, access=None, **targets):
    return make_config(tmp_path, targets={"echo": ECHO, "ok": OK, "slow": SLOW, **targets},
                       queue={"workers": 2}, access=access or {})


async def test_rerun_of_a_job_runs_the_same_target_and_arguments_as_a_new_job(tmp_path,
                                                                              running_app):
    app = await running_app(config(tmp_path, access={"allowed_users": ["@bob:example.org"]}))
    first = await app.submit("echo", ["hello"], caller=Caller(ADMIN, Via.API))
    assert first.requester == "api"
    await final_state(app, first.id)
    again = await app.rerun(first.id, Caller.in_room("@bob:example.org", Place("!r:example.org")))
    assert again.id != first.id
    assert (again.name, again.data["args"], again.requester) == ("echo hello", ["hello"],
                                                                 "@bob:example.org")
    assert (await final_state(app, again.id)).status is Status.COMPLETED


async def test_rerun_of_a_batch_queues_the_same_operations_as_a_new_batch(tmp_path,
                                                                         running_app):
    app = await running_app(config(tmp_path))
    first = await app.submit_batch(["ok", "echo", "ok"], name="nightly")
    await final_state(app, first.id)
    again = await app.rerun(first.id)
    assert again.id.startswith("b") and again.id != first.id
    assert (again.name, again.total) == ("nightly", 3)
    operations = await app.store.list_jobs(batch_id=again.id)
    assert [job.name for job in reversed(operations)] == ["ok", "echo", "ok"]
    assert (await final_state(app, again.id)).status is Status.COMPLETED


async def test_rerun_of_one_operation_of_a_batch_runs_just_that_target(tmp_path, running_app):
    app = await running_app(config(tmp_path))
    batch = await app.submit_batch(["ok", "echo"])
    await final_state(app, batch.id)
    operation = (await app.store.list_jobs(batch_id=batch.id))[0]
    again = await app.rerun(operation.id)
    assert again.batch_id is None and again.name == operation.name


async def test_a_running_job_can_be_rerun(tmp_path, running_app):
    app = await running_app(config(tmp_path))
    running = await app.submit("slow")
    again = await app.rerun(running.id)
    assert (await app.status(running.id)).status in (Status.PENDING, Status.PROCESSING)
    assert again.id != running.id and again.name == "slow"
    await app.cancel(running.id)
    await app.cancel(again.id)


async def test_rerun_of_an_unknown_id_is_not_found(tmp_path, running_app):
    app = await running_app(config(tmp_path))
    for subject in ("j99", "b99", "x1"):
        with pytest.raises(NotFoundError):
            await app.rerun(subject)


async def test_rerun_with_the_same_dedupe_key_queues_nothing_twice(tmp_path, running_app):
    app = await running_app(config(tmp_path))
    first = await app.submit("ok")
    await app.rerun(first.id, dedupe_key="$reaction")
    with pytest.raises(AlreadySubmittedError):
        await app.rerun(first.id, dedupe_key="$reaction")
    assert len(await app.jobs()) == 2


async def test_rerun_checks_the_current_configuration(tmp_path):
    async with App(config(tmp_path, gone=OK)) as app:
        gone = await app.submit("gone")
        echo = await app.submit("echo", ["hello"])
        await final_state(app, echo.id)
    narrower = dict(ECHO, args_pattern="[0-9]+")
    async with App(make_config(tmp_path, targets={"echo": narrower})) as app:
        with pytest.raises(TargetGoneError, match=f"cannot rerun {gone.id}: its target 'gone' "
                                                  "is no longer configured"):
            await app.rerun(gone.id)
        with pytest.raises(BadArgumentsError, match=f"cannot rerun {echo.id}: argument 'hello'"):
            await app.rerun(echo.id)
        assert len(await app.jobs()) == 2


async def test_previous_outcome_is_the_last_finished_run_of_the_same_work(tmp_path,
                                                                          running_app):
    marker = tmp_path / "broken"
    app = await running_app(config(tmp_path, flaky=flaky(marker)))

    async def run(target: str = "flaky") -> str:
        job = await app.submit(target)
        await final_state(app, job.id)
        return job.id

    first = await run()
    assert await app.previous_outcome(first) is None
    marker.touch()
    failed = await run()
    cancelled = await app.submit("flaky")
    await app.cancel(cancelled.id)
    await run("ok")  # other work does not count
    marker.unlink()
    fixed = await run()
    again = await run()
    assert await app.previous_outcome(failed) is Status.COMPLETED
    assert await app.previous_outcome(fixed) is Status.FAILED  # the cancelled run is skipped
    assert await app.previous_outcome(again) is Status.COMPLETED


async def test_previous_outcome_of_a_batch_is_the_last_batch_of_that_name(tmp_path,
                                                                          running_app):
    marker = tmp_path / "broken"
    marker.touch()
    app = await running_app(config(tmp_path, flaky=flaky(marker)))
    failed = await app.submit_batch(["ok", "flaky"])
    await final_state(app, failed.id)
    marker.unlink()
    fixed = await app.rerun(failed.id)
    await final_state(app, fixed.id)
    assert await app.previous_outcome(fixed.id) is Status.FAILED

"""What the log says while the store is in trouble, the trouble caused for real (a SQLite
store another connection holds write-locked): a retried step says the store in one line,
never with a traceback (that stays for bugs).
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from helpers import final_state, make_config, python_target, write_locked

from matrixjobs.app import App
from matrixjobs.models import Status


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.exc_info]


async def until_status(app: App, job_id: str, status: Status, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (await app.status(job_id)).status is not status:
        assert time.monotonic() < deadline, f"{job_id} not {status} within {timeout} s"
        await asyncio.sleep(0.05)


async def test_a_locked_store_is_said_in_one_line_by_the_steps_that_retry(tmp_path, caplog):
    """A job ends while the store is locked: the dispatcher cannot record its outcome and
    retries, the heartbeat cannot renew the lease. Each says so once, in one line."""
    caplog.set_level(logging.INFO, logger="matrixjobs")
    config = make_config(tmp_path, api={"enabled": False}, queue={"lease_s": 3},
                         targets={"short": python_target("import time; time.sleep(1)")})
    app = App(config)
    await app.start()
    try:
        job = await app.submit("short")
        await until_status(app, job.id, Status.PROCESSING, 10)
        async with write_locked(config.store.path):
            # It ends; its outcome waits (behind the heartbeat) out SQLite's busy timeout.
            deadline = time.monotonic() + 30
            while "store cycle failed" not in caplog.text:
                assert time.monotonic() < deadline, caplog.text
                await asyncio.sleep(0.1)
        assert (await final_state(app, job.id)).status is Status.COMPLETED
    finally:
        await app.stop()
    said = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("store cycle failed; retrying every 1s (1 outcomes wait) "
                               "(OperationalError: database is locked)") for line in said), said
    assert "store cycle works again" in said
    assert tracebacks(caplog) == []


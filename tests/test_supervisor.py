"""The service's small background loops end when stopped, even when a library loses the
cancel (Python 3.11's asyncio.wait_for returns the awaited result when it completes at the
moment of the cancel; psycopg_pool waits for a connection that way)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from matrixjobs.supervisor import Supervisor


@pytest.mark.timeout(10)  # before the fix: stop() waited for ever
async def test_a_loop_whose_step_lost_the_cancel_still_ends_at_stop():
    steps = 0
    started = asyncio.Event()

    async def step_that_swallows_a_cancel() -> None:
        nonlocal steps
        steps += 1
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return  # what wait_for does when its inner wait completes at that moment

    supervisor = Supervisor()
    supervisor.every("swallower", 0.0, step_that_swallows_a_cancel)
    await started.wait()
    await asyncio.wait_for(supervisor.stop(), 2.0)
    assert steps == 1


@pytest.mark.timeout(10)
async def test_a_kept_loop_that_lost_its_cancel_is_cancelled_again_at_stop():
    started = asyncio.Event()

    async def run_forever_losing_one_cancel() -> None:
        started.set()
        with contextlib.suppress(asyncio.CancelledError):  # lost, as wait_for loses one
            await asyncio.sleep(10)
        await asyncio.sleep(10)  # the second cancel ends it here

    supervisor = Supervisor()
    supervisor.keep("loser", run_forever_losing_one_cancel)
    await started.wait()
    await asyncio.wait_for(supervisor.stop(), 3.0)

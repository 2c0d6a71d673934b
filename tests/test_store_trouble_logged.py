"""What the service's log, a followed log and the jobs' stored logs say while the store is
in trouble, the trouble caused for real (a SQLite store another connection holds
write-locked, a disk below the free-space floor, a PostgreSQL server cut off behind a
proxy): a retried step says the store in one line, never with a traceback (that stays
for bugs); a follow of a log the store fails under ends cleanly, saying so; below the
floor a running job's log is stored only in its last part.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator

import httpx2
import pytest
from helpers import final_state, make_config, python_target, write_locked
from tcp_proxy import TcpProxy

from matrixjobs.api import ApiServer
from matrixjobs.app import App
from matrixjobs.models import Status
from matrixjobs.service import build_service


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.exc_info]


async def until_status(app: App, job_id: str, status: Status, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (await app.status(job_id)).status is not status:
        assert time.monotonic() < deadline, f"{job_id} not {status} within {timeout} s"
        await asyncio.sleep(0.05)


async def test_a_locked_store_is_said_in_one_line_by_the_steps_that_retry(tmp_path, caplog):
    """A job ends while the store is locked: the dispatcher cannot record its outcome and
    retries, the heartbeat cannot renew the lease. Each says so once, in one line; each
    retry after that one debug line."""
    caplog.set_level(logging.DEBUG, logger="matrixjobs")
    config = make_config(tmp_path, api={"enabled": False}, queue={"lease_s": 3},
                         targets={"short": python_target("import time; time.sleep(1)")})
    app = App(config)
    await app.start()
    try:
        job = await app.submit("short")
        await until_status(app, job.id, Status.PROCESSING, 10)
        async with write_locked(config.store.path):
            # It ends; its outcome waits (behind the heartbeat) out SQLite's busy timeout,
            # then is retried every second (at once refused, once the probe found the lock).
            deadline = time.monotonic() + 30
            while "store cycle failed again" not in caplog.text:
                assert time.monotonic() < deadline, caplog.text
                await asyncio.sleep(0.1)
        assert (await final_state(app, job.id)).status is Status.COMPLETED
    finally:
        await app.stop()
    said = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("store cycle failed; retrying every 1s (1 outcomes wait) "
                               "(OperationalError: database is locked)") for line in said), said
    assert "store cycle works again" in said
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert "store cycle failed again (OperationalError: database is locked); retrying" in debug
    assert any(re.fullmatch(r"the store is still unavailable \(locked, \d+ errors of this "
                            r"kind\)", line) for line in debug), debug
    assert tracebacks(caplog) == []


@contextlib.asynccontextmanager
async def service_behind(proxy: TcpProxy, pg_url: str, tmp_path) -> AsyncIterator[
        tuple[App, httpx2.AsyncClient]]:
    behind = pg_url.replace(":5432/", f":{proxy.port}/", 1)
    config = make_config(tmp_path, queue={"workers": 1},
                         store={"backend": "postgresql", "url": behind},
                         targets={"slow": python_target("import time; time.sleep(60)")})
    app = build_service(config)
    await app.start()
    try:
        [api] = [c for c in app.components if isinstance(c, ApiServer)]
        async with httpx2.AsyncClient(base_url=api.url) as client:
            yield app, client
    finally:
        proxy.restore()  # the service stops quickly
        await app.stop()


async def test_a_follow_the_store_fails_under_ends_saying_so(tmp_path, pg_url, caplog):
    """A follow of a job waiting for a worker reads the store each second: cut off, the
    follow ends with a last line, the body complete, and the log says it in one line."""
    caplog.set_level(logging.INFO, logger="matrixjobs")
    async with TcpProxy("127.0.0.1", 5432) as proxy, \
            service_behind(proxy, pg_url, tmp_path) as (app, client):
        await app.submit("slow")  # takes the only worker
        waiting = await app.submit("slow")
        async with client.stream("GET", f"/v1/jobs/{waiting.id}/log?follow=true",
                                 timeout=60) as response:
            assert response.status_code == 200
            await asyncio.sleep(1)
            proxy.cut()
            body = await asyncio.wait_for(response.aread(), 40)
    assert body.decode() == "\n[the follow ends here: store: unreachable; try again in 10 s]\n"
    assert f"a follow of {waiting.id}'s log ended: store: unreachable; try again in 10 s" in [
        r.getMessage() for r in caplog.records]
    assert tracebacks(caplog) == []


async def test_below_the_free_space_floor_a_running_jobs_log_is_saved_only_in_its_tail(
        tmp_path, caplog):
    """Its log is saved while it runs (at each heartbeat): below the floor only its end
    is, and the service's log says so once."""
    caplog.set_level(logging.INFO, logger="matrixjobs")
    chatty = python_target("""
        import time
        for n in range(100_000):
            print(f"line {n} " + "x" * 60, flush=True)
            time.sleep(0.002)
    """)
    config = make_config(tmp_path, api={"enabled": False}, queue={"lease_s": 1.5},
                         store={"min_free_mb": 1024**3}, targets={"chatty": chatty})
    app = App(config)
    await app.start()
    try:
        job = await app.submit("chatty")  # before the probe finds the disk below the floor
        deadline = time.monotonic() + 20
        while app.health.up:
            assert time.monotonic() < deadline, "the floor was not found"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)  # a few more saves, of output written since
        saved = await app.store.get_log(job.id) or ""
        await app.cancel(job.id)
    finally:
        await app.stop()
    assert saved.startswith("[… the disk was almost full: only the end of this log was kept]")
    assert len(saved.encode()) < 17 * 1024 and "line 0 " not in saved
    assert saved.rstrip().endswith("x" * 60)
    told = [r.getMessage() for r in caplog.records if "almost full" in r.getMessage()]
    assert told == [f"job {job.id}: the disk is almost full; keeping only the last 16 KiB "
                    "of its log"]

"""Crash safety: kill -9 the real service mid-job; the job is retried (or failed) on restart."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from containment import gone_within

from matrixjobs.models import JobSpec
from matrixjobs.store.sqlite import SqliteStore

WORK = """
import os, sys, time
with open(sys.argv[1], "a") as runs:
    runs.write(f"{os.getpid()}\\n")
for step in range(1, 11):
    print(f"::progress {step}/10 step {step}", flush=True)
    time.sleep(0.15)
"""


def write_config(tmp_path: Path) -> Path:
    (tmp_path / "work.py").write_text(WORK)
    config = tmp_path / "config.toml"
    config.write_text(textwrap.dedent(f"""
        [store]
        path = "jobs.db"
        [queue]
        retry_backoff_s = 0.1
        lease_s = 3
        [api]
        listen = "127.0.0.1:0"
        [targets.work]
        command = [{sys.executable!r}, {str(tmp_path / "work.py")!r}, "runs.txt"]
    """))
    return config


async def enqueue_offline(db: Path, max_retries: int) -> str:
    store = SqliteStore(db)
    await store.open()
    [job] = await store.add_jobs(
        [JobSpec("command", {"target": "work", "args": []}, "work", max_retries=max_retries,
                 timeout_s=60)],
        time.time(),
    )
    await store.close()
    return job.id


def start_service(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "matrixjobs", "run", "--config", str(config)],
        cwd=config.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def job_row(db: Path, job_id: str) -> tuple:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as raw:
        return raw.execute(
            "SELECT status, retry_count, error, progress_current FROM jobs WHERE id = ?",
            (int(job_id[1:]),),
        ).fetchone()


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def runs(tmp_path: Path) -> list[int]:
    path = tmp_path / "runs.txt"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def kill_mid_job(tmp_path: Path, config: Path, db: Path, job_id: str) -> None:
    service = start_service(config)
    try:
        wait_for(lambda: runs(tmp_path) and (job_row(db, job_id)[3] or 0) >= 2)
        service.send_signal(signal.SIGKILL)
        service.wait(10)
    finally:
        if service.poll() is None:
            service.kill()
    # Nobody's help is needed: the job's processes died with the service.
    gone_within(str(tmp_path / "work.py"), 1.0)
    assert job_row(db, job_id)[0] == "processing"


def stop(service: subprocess.Popen) -> None:
    service.send_signal(signal.SIGTERM)
    assert service.wait(15) == 0


@pytest.mark.timeout(60)
async def test_job_killed_mid_run_is_retried_after_restart(tmp_path):
    config = write_config(tmp_path)
    db = tmp_path / "jobs.db"
    job_id = await enqueue_offline(db, max_retries=2)
    await asyncio.to_thread(kill_mid_job, tmp_path, config, db, job_id)

    service = start_service(config)
    try:
        await asyncio.to_thread(wait_for, lambda: job_row(db, job_id)[0] == "completed")
    finally:
        stop(service)
    status, retry_count, _error, progress = job_row(db, job_id)
    assert (status, retry_count, progress) == ("completed", 1, 10)
    assert len(runs(tmp_path)) == 2


@pytest.mark.timeout(60)
async def test_job_killed_with_no_retries_left_fails_as_interrupted(tmp_path):
    config = write_config(tmp_path)
    db = tmp_path / "jobs.db"
    job_id = await enqueue_offline(db, max_retries=0)
    await asyncio.to_thread(kill_mid_job, tmp_path, config, db, job_id)

    service = start_service(config)
    try:
        await asyncio.to_thread(wait_for, lambda: job_row(db, job_id)[0] == "failed")
    finally:
        stop(service)
    assert job_row(db, job_id)[:3] == ("failed", 0, "interrupted")
    assert len(runs(tmp_path)) == 1

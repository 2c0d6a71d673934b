"""`matrixjobs migrate-store`: a real SQLite store copied into a real PostgreSQL database."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg
import pytest
from helpers import make_config
from test_doctor import child_env

from matrixjobs.app import App
from matrixjobs.cli import main
from matrixjobs.errors import AlreadySubmittedError
from matrixjobs.exitcodes import EXIT_FAILED, EXIT_OK
from matrixjobs.models import JobSpec, Outcome, ProgressMessage, Status
from matrixjobs.store.sqlite import SqliteStore

ROOM, EVENT = "!room:example.org", "$progress-event"
REPLAYED = "$command-event"
SETTINGS = {"matrix.user_id": "@jobs:example.org", "matrix.device_id": "DEVICE1",
            "matrix.access_token": "syt_secret_token"}


def spec(name: str, max_retries: int = 1) -> JobSpec:
    return JobSpec("t", {"n": name}, name, max_retries=max_retries, timeout_s=60,
                   requester="@alice:example.org")


async def fill(path: Path) -> dict[str, Status]:
    """A store with a job in every status, a batch, logs, a message, an event and settings;
    returns the status of each job."""
    now = time.time()
    store = SqliteStore(path)
    await store.open()
    try:
        done, failed, cancelled, waiting = await store.add_jobs(
            [spec("done"), spec("failed", 0), spec("cancelled"), spec("waiting")], now,
            dedupe_key=REPLAYED)
        await store.add_batch("both", [spec("b1"), spec("b2")], now)
        await store.settle_and_claim([], "old", 10, now, 60)
        running = (await store.add_jobs([spec("running", 0)], now))[0]
        await store.settle_and_claim([
            Outcome(done.id, Status.COMPLETED, now, result={"ok": 1}, log="all done\n"),
            Outcome(failed.id, Status.FAILED, now, error="boom", log="it broke\n"),
            Outcome(cancelled.id, Status.CANCELLED, now),
            # pending again, an hour from now: the App below does not run it
            Outcome(waiting.id, Status.PENDING, now, error="later", retry_at=now + 3600),
            Outcome("j5", Status.COMPLETED, now), Outcome("j6", Status.COMPLETED, now),
        ], "old", 1, now, 60)  # claims `running` and leaves it running, as a crash would
        await store.save_logs({running.id: "half way\n"})
        await store.save_message(ProgressMessage(done.id, ROOM, EVENT, "@alice:example.org",
                                                 "$reply"), now)
        for key, value in SETTINGS.items():
            await store.set_setting(key, value)
        return {job.id: job.status for job in await store.list_jobs(limit=100)}
    finally:
        await store.close()


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(textwrap.dedent(f"""
        [store]
        path = "{tmp_path / 'matrixjobs.db'}"
        [api]
        enabled = false
    """))
    return config


async def migrate(config: Path, url: str,
                  capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    # The CLI runs its own event loop: in a thread, beside the test's.
    code = await asyncio.to_thread(main, ["migrate-store", "--config", str(config), "--to", url])
    out, err = capsys.readouterr()
    return code, out, err


async def test_a_migrated_store_keeps_jobs_messages_dedupe_and_settings(
        tmp_path, pg_url, capsys):
    before = await fill(tmp_path / "matrixjobs.db")
    assert set(before.values()) == set(Status)

    code, out, err = await migrate(write_config(tmp_path), pg_url, capsys)

    assert (code, err) == (EXIT_OK, "")
    for table, count in [("batches", 1), ("jobs", 7), ("job_logs", 3),
                         ("progress_messages", 1), ("processed_events", 1), ("settings", 3)]:
        assert f"  {table:<18} {count}\n" in out
    assert "1 job(s) were left running" in out
    assert 'backend = "postgresql"' in out
    app = App(make_config(tmp_path, store={"backend": "postgresql", "url": pg_url},
                          api={"enabled": False}))
    async with app:
        after = {job.id: job for job in await app.jobs(limit=100)}
        assert {jid: job.status for jid, job in after.items()} == {
            **before, "j7": Status.FAILED}  # the running job was interrupted, out of retries
        assert {job.requester for job in after.values()} == {"@alice:example.org"}
        assert after["j1"].result == {"ok": 1} and after["j4"].run_after > time.time()
        assert [await app.log(jid) for jid in ("j1", "j2", "j7")] == [
            "all done\n", "it broke\n", "half way\n"]
        assert await app.shown_by(ROOM, EVENT) == "j1"
        assert (await app.progress_message("j1")).reply_to == "$reply"
        assert {key: await app.store.get_setting(key) for key in SETTINGS} == SETTINGS
        assert (await app.batches())[0].id == "b1"
        with pytest.raises(AlreadySubmittedError):
            await app.store.add_jobs([spec("again")], time.time(), dedupe_key=REPLAYED)
        [new_job] = await app.store.add_jobs([spec("new")], time.time())
        new_batch, _ = await app.store.add_batch("new", [spec("n")], time.time())
    assert (new_job.id, new_batch.id) == ("j8", "b2")


async def test_ids_of_purged_jobs_are_not_given_again(tmp_path, pg_url, capsys):
    store = SqliteStore(tmp_path / "matrixjobs.db")
    await store.open()
    jobs = await store.add_jobs([spec("a"), spec("b")], 100.0)
    await store.settle_and_claim([], "old", 2, 100.0, 60)
    await store.settle_and_claim([Outcome(job.id, Status.COMPLETED, 101.0) for job in jobs],
                                 "old", 0, 101.0, 60)
    assert await store.purge_finished(200.0) == 2
    await store.close()

    code, out, _ = await migrate(write_config(tmp_path), pg_url, capsys)

    assert code == EXIT_OK and "new ids continue: batches after 0, jobs after 2" in out
    with psycopg.connect(pg_url) as conn:
        [(number,)] = conn.execute("INSERT INTO jobs (type, name, data, status, max_retries, "
                                   "timeout_s, created_at) VALUES ('t', 'c', '{}', 'pending', "
                                   "0, 1, 0) RETURNING id")
    assert number == 3


async def test_a_database_with_matrixjobs_data_is_refused_and_left_alone(
        tmp_path, pg_url, capsys):
    await fill(tmp_path / "matrixjobs.db")
    config = write_config(tmp_path)
    assert (await migrate(config, pg_url, capsys))[0] == EXIT_OK

    code, out, err = await migrate(config, pg_url, capsys)

    assert (code, out) == (EXIT_FAILED, "")
    assert "already holds matrixjobs data (1 batches, 7 jobs" in err
    assert "nothing was copied" in err
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (7,)


def test_a_store_the_service_holds_is_refused(tmp_path, pg_url):
    config = write_config(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-m", "matrixjobs", "run", "--config", str(config)],
        env=child_env(), stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / "matrixjobs.db.lock"
        deadline = time.monotonic() + 30
        while not (lock.exists() and lock.read_text().strip()):
            assert time.monotonic() < deadline and holder.poll() is None
            time.sleep(0.1)
        result = subprocess.run(
            [sys.executable, "-m", "matrixjobs", "migrate-store", "--config", str(config),
             "--to", pg_url], env=child_env(), capture_output=True, text=True, timeout=60)
    finally:
        holder.terminate()
        holder.wait(30)
    assert result.returncode == EXIT_FAILED
    assert f"the service (pid {holder.pid}) has {tmp_path / 'matrixjobs.db'} open" in (
        result.stderr)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('jobs')").fetchone() == (None,)


async def test_an_unreachable_target_is_named_by_host_and_port_never_the_password(
        tmp_path, capsys):
    from test_store_postgres import free_port

    port = free_port()
    (tmp_path / "matrixjobs.db").touch()
    code, out, err = await migrate(write_config(tmp_path),
                             f"postgresql://mj:pw-5150@127.0.0.1:{port}/jobs", capsys)
    assert (code, out) == (EXIT_FAILED, "")
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}/jobs" in err
    assert "pw-5150" not in err


def test_no_target_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MATRIXJOBS_DATABASE_URL", raising=False)
    code = main(["migrate-store", "--config", str(write_config(tmp_path))])
    assert code == 2
    assert "--to postgresql://" in capsys.readouterr().err

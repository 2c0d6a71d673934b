"""The real service stopped mid-job (SIGTERM or kill -9): the same message reaches its final
state, before the exit or after the restart."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import bot_tables
from matrix_people import Person, bot_messages

from matrixjobs.store.sqlite import SqliteStore

pytestmark = pytest.mark.timeout(120)

SLOW = """
import os, sys, time
with open("pids.txt", "a") as pids:
    pids.write(f"{os.getpid()}\\n")
for i in range(1, 11):
    time.sleep(0.4)
    print(f"::progress {i}/10 step {i}", flush=True)
"""


def write_config(directory: Path, homeserver: str, bot: str, alice: str,
                 grace_s: float = 30) -> Path:
    (directory / "slow.py").write_text(SLOW)
    config = directory / "config.toml"
    config.write_text(bot_tables(homeserver, bot, alice) + textwrap.dedent(f"""
        [store]
        path = "state/jobs.db"
        [queue]
        shutdown_grace_s = {grace_s}
        kill_grace_s = 2
        [progress]
        interval_ms = 200
        [api]
        listen = "127.0.0.1:0"
        [targets.slow]
        command = [{sys.executable!r}, "slow.py"]
    """))
    return config


def start(config: Path, log_level: str = "info") -> subprocess.Popen:
    env = {**os.environ, "MATRIXJOBS_PASSWORD": "bot-password"}
    return subprocess.Popen([sys.executable, "-m", "matrixjobs", "run", "--config", str(config),
                             "--log-level", log_level],
                            cwd=config.parent, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(config.parent / "service.log", "a"))


def wait_for(check, timeout=40.0):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    return result


def test_killed_bot_finishes_the_same_message_after_restart(synapse, tmp_path):
    bot = synapse.register("restartbot", password="bot-password")["user_id"]
    alice = Person.register(synapse, "restartalice")
    room = alice.create_room([bot])
    config = write_config(tmp_path, synapse.base_url, bot, alice.user_id)

    def message_for(command):
        messages, strays = bot_messages(alice.timeline(room), bot)
        assert strays == []
        return [m for m in messages if m.reply_to == command]

    service = start(config)
    try:
        wait_for(lambda: bot in alice.members(room))
        command = alice.send(room, "!build slow")
        running = wait_for(lambda: [m for m in message_for(command)
                                    if m.current.startswith("🔄") and "/10" in m.current])
        os.kill(service.pid, signal.SIGKILL)
        service.wait(10)
    finally:
        if service.poll() is None:
            service.kill()
    for pid in (tmp_path / "pids.txt").read_text().split():  # systemd's cgroup would do this
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(pid), signal.SIGKILL)

    service = start(config)
    try:
        done = wait_for(lambda: [m for m in message_for(command)
                                 if m.current.startswith("✅")])
        assert [m.event_id for m in message_for(command)] == [running[0].event_id]
        assert done[0].event_id == running[0].event_id
        assert "100%" in done[0].current
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(20) == 0
    assert len((tmp_path / "pids.txt").read_text().split()) == 2  # interrupted, then retried


def test_job_queued_before_a_crash_gets_its_message_after_restart(synapse, tmp_path):
    """The bot died between accepting the command and sending the first message."""
    import asyncio

    from matrixjobs.models import JobSpec, ProgressMessage

    bot = synapse.register("lostbot", password="bot-password")["user_id"]
    alice = Person.register(synapse, "lostalice")
    room = alice.create_room([bot])
    config = write_config(tmp_path, synapse.base_url, bot, alice.user_id)
    service = start(config)  # a first run: the bot joins the room
    try:
        wait_for(lambda: bot in alice.members(room))
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(20) == 0
    command = alice.send(room, "!build slow")  # what the bot had read before dying

    async def accepted_but_never_shown() -> str:
        store = SqliteStore(tmp_path / "state" / "jobs.db")
        await store.open()
        [job] = await store.add_jobs([JobSpec("command", {"target": "slow", "args": []},
                                              "slow", max_retries=2, timeout_s=60)],
                                     time.time(), dedupe_key=command)
        await store.save_message(ProgressMessage(job.id, room, None, alice.user_id, command),
                                 time.time())
        await store.close()
        return job.id

    asyncio.run(accepted_but_never_shown())
    service = start(config)
    try:
        def final():
            messages, _ = bot_messages(alice.timeline(room), bot)
            return [m for m in messages if m.reply_to == command and m.current.startswith("✅")]

        [message] = wait_for(final)
        assert "slow" in message.current
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(20) == 0


def test_sigterm_mid_job_finishes_it_and_the_message_before_exiting(synapse, tmp_path):
    """Within the grace period the job completes, its final edit is sent before the
    process exits, and a command that arrives meanwhile is refused with a reply."""
    bot = synapse.register("gracebot", password="bot-password")["user_id"]
    alice = Person.register(synapse, "gracealice")
    room = alice.create_room([bot])
    config = write_config(tmp_path, synapse.base_url, bot, alice.user_id, grace_s=30)
    service = start(config, log_level="debug")  # the most a log ever shows
    try:
        wait_for(lambda: bot in alice.members(room))
        command = alice.send(room, "!build slow")
        wait_for(lambda: [m for m in bot_messages(alice.timeline(room), bot)[0]
                          if m.reply_to == command and m.current.startswith("🔄")])
        service.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        late = alice.send(room, "!build slow")
        assert service.wait(30) == 0
    finally:
        if service.poll() is None:
            service.kill()
    # No restart: everything below was sent by the stopping service.
    messages, strays = bot_messages(alice.timeline(room), bot)
    [done] = [m for m in messages if m.reply_to == command]
    assert done.current.startswith("✅") and "100%" in done.current
    [refusal] = [m for m in messages if m.reply_to == late]
    assert "shutting down" in refusal.current
    assert strays == []
    assert len((tmp_path / "pids.txt").read_text().split()) == 1
    log = (tmp_path / "service.log").read_text()
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "jobs.db")) as raw:
        [(token,)] = raw.execute(
            "SELECT value FROM settings WHERE key = 'matrix.access_token'").fetchall()
    assert token and token not in log
    assert "bot-password" not in log


def test_sigterm_past_the_grace_period_shows_the_requeue_then_finishes(synapse, tmp_path):
    bot = synapse.register("requeuebot", password="bot-password")["user_id"]
    alice = Person.register(synapse, "requeuealice")
    room = alice.create_room([bot])
    config = write_config(tmp_path, synapse.base_url, bot, alice.user_id, grace_s=0.2)

    def message_for(command):
        [message] = [m for m in bot_messages(alice.timeline(room), bot)[0]
                     if m.reply_to == command]
        return message

    service = start(config)
    try:
        wait_for(lambda: bot in alice.members(room))
        command = alice.send(room, "!build slow")
        wait_for(lambda: [m for m in bot_messages(alice.timeline(room), bot)[0]
                          if m.reply_to == command and m.current.startswith("🔄")])
        service.send_signal(signal.SIGTERM)
        assert service.wait(30) == 0
    finally:
        if service.poll() is None:
            service.kill()
    stopped = message_for(command)
    assert stopped.current.startswith("⏳"), stopped.current
    assert "runs again" in stopped.current

    service = start(config)
    try:
        done = wait_for(lambda: message_for(command).current.startswith("✅")
                        and message_for(command))
        assert done.event_id == stopped.event_id
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(20) == 0
    assert len((tmp_path / "pids.txt").read_text().split()) == 2

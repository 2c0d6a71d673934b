"""Two real `matrixjobs run` nodes share a PostgreSQL store and one bot account: one answers,
and when it dies (kill -9) or loses its lock the other takes over the same messages."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import bot_tables
from matrix_people import Person, bot_messages
from service_process import Service
from test_standby import terminate_role_sessions

pytestmark = pytest.mark.timeout(120)

LEASE_S = 3
SLOW = """
import os, time
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pids.txt"), "a") as pids:
    pids.write(f"{os.getpid()}\\n")
for i in range(1, 21):
    time.sleep(0.4)
    print(f"::progress {i}/20 step {i}", flush=True)
"""

BROKEN = """
import sys, time
for i in range(1, 6):
    time.sleep(0.3)
    print(f"::progress {i}/10 step {i}", flush=True)
print("it broke", flush=True)
sys.exit(2)
"""


def node_config(directory: Path, name: str, workers: int, homeserver: str, bot: str,
                alice: str, pg_url: str) -> Path:
    directory.mkdir()
    (directory / "slow.py").write_text(SLOW)
    (directory / "broken.py").write_text(BROKEN)
    config = directory / "config.toml"
    config.write_text(bot_tables(homeserver, bot, alice) + textwrap.dedent(f"""
        [store]
        backend = "postgresql"
        url = "{pg_url}"
        path = "state/jobs.db"
        [worker]
        name = "{name}"
        [queue]
        workers = {workers}
        lease_s = {LEASE_S}
        kill_grace_s = 1
        shutdown_grace_s = 1
        [progress]
        interval_ms = 200
        [api]
        listen = "127.0.0.1:0"
        [targets.slow]
        command = [{sys.executable!r}, "slow.py"]
        [targets.broken]
        command = [{sys.executable!r}, "broken.py"]
        max_retries = 0
    """))
    return config


def start(config: Path, env: dict[str, str] | None = None) -> Service:
    return Service(config.parent, config, env=env or {"MATRIXJOBS_PASSWORD": "bot-password"})


def wait_for(check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return result


class Room:
    def __init__(self, alice: Person, room: str, bot: str) -> None:
        self.alice, self.room, self.bot = alice, room, bot

    def answers(self, command: str) -> list:
        messages, strays = bot_messages(self.alice.timeline(self.room), self.bot)
        assert strays == []
        return [m for m in messages if m.reply_to == command]

    def answer(self, command: str):
        [message] = wait_for(lambda: self.answers(command))
        return message


@pytest.fixture
def scene(synapse, pg_url, tmp_path):
    """Node a (runs no jobs) starts first and leads; node b runs the jobs and stands by."""
    suffix = os.urandom(3).hex()
    bot = synapse.register(f"standbybot{suffix}", password="bot-password")["user_id"]
    alice = Person.register(synapse, f"standbyalice{suffix}")
    room = alice.create_room([bot])
    configs = {name: node_config(tmp_path / name, f"node-{name}", workers, synapse.base_url,
                                 bot, alice.user_id, pg_url)
               for name, workers in (("a", 0), ("b", 2))}
    nodes: dict[str, Service] = {}
    try:
        nodes["a"] = start(configs["a"])
        nodes["a"].wait_for_log("bot: leading")
        wait_for(lambda: bot in alice.members(room))
        nodes["b"] = start(configs["b"])
        nodes["b"].wait_for_log("bot: standing by (held by matrixjobs pid "
                                f"{nodes['a'].process.pid} on ")
        yield Room(alice, room, bot), nodes
    finally:
        for node in nodes.values():
            node.stop()
        pids = tmp_path / "b" / "pids.txt"
        for pid in pids.read_text().split() if pids.exists() else ():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid), signal.SIGKILL)


def test_killed_leader_is_replaced_and_no_command_is_answered_twice(scene):
    room, nodes = scene
    status = room.alice.send(room.room, "!status")
    room.answer(status)
    build = room.alice.send(room.room, "!build slow")
    shown = room.answer(build)
    os.kill(nodes["a"].process.pid, signal.SIGKILL)
    killed = time.monotonic()
    nodes["b"].wait_for_log("bot: leading", timeout=LEASE_S + 2)
    took_over_s = time.monotonic() - killed
    nodes["b"].wait_for_log("matrix: logged in as")
    after = room.alice.send(room.room, "!status")
    assert "slow" in room.answer(after).current
    done = wait_for(lambda: [m for m in room.answers(build) if m.current.startswith("✅")])
    assert [m.event_id for m in done] == [shown.event_id]  # the same message, edited
    assert "100%" in done[0].current
    for command in (status, build, after):
        assert len(room.answers(command)) == 1
    print(f"takeover after kill -9: {took_over_s:.2f} s")


def test_leader_whose_lock_session_ends_stops_answering_and_the_standby_answers(
        scene, pg_url):
    room, nodes = scene
    assert terminate_role_sessions(pg_url) == 1
    nodes["a"].wait_for_log("bot: lost the lead", timeout=LEASE_S)
    nodes["b"].wait_for_log("bot: leading", timeout=LEASE_S + 2)
    nodes["b"].wait_for_log("matrix: logged in as")
    command = room.alice.send(room.room, "!targets")
    room.answer(command)
    time.sleep(2)  # a's bot, were it still running, would have answered by now too
    assert len(room.answers(command)) == 1
    assert nodes["a"].process.poll() is None  # a goes on serving its API, standing by
    assert re.search(r"bot: standing by \(held by matrixjobs pid \d+", nodes["a"].log)


def test_one_access_token_on_two_nodes_is_refused_by_the_second(synapse, pg_url, tmp_path):
    """A token is one device; the second node to lead would be it with another crypto store."""
    account = synapse.register(f"tokenbot{os.urandom(3).hex()}", password="bot-password")
    alice = Person.register(synapse, f"tokenalice{os.urandom(3).hex()}")
    room = alice.create_room([account["user_id"]])
    env = {"MATRIXJOBS_ACCESS_TOKEN": account["access_token"]}
    first, second = (node_config(tmp_path / name, f"node-{name}", 1, synapse.base_url,
                                 account["user_id"], alice.user_id, pg_url)
                     for name in ("a", "b"))
    a, b = start(first, env), None
    try:
        a.wait_for_log("matrix: logged in as")
        wait_for(lambda: account["user_id"] in alice.members(room))
        b = start(second, env)
        b.wait_for_log("bot: standing by")
        os.kill(a.process.pid, signal.SIGKILL)
        b.wait_for_log(f"device {account['device_id']} is already the bot's device on node "
                       "node-a (the same access token?)", timeout=LEASE_S + 5)
        assert "matrix: logged in as" not in b.log
        assert account["access_token"] not in b.log
        command = alice.send(room, "!targets")
        time.sleep(2)
        assert Room(alice, room, account["user_id"]).answers(command) == []
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_the_leader_shows_a_job_another_node_runs_live_and_attaches_its_failed_log(scene):
    """Node a answers but runs no jobs: the job runs on node b, and a's bot follows it
    through the shared store, edit by edit, to ❌ with the log as a file."""
    room, _ = scene
    build = room.alice.send(room.room, "!build broken")
    shown = room.answer(build)
    [failed] = wait_for(lambda: [m for m in room.answers(build) if m.current.startswith("❌")])
    assert failed.event_id == shown.event_id
    bodies = [edit["content"]["m.new_content"]["body"] for edit in failed.edits]
    assert any(body.startswith("🔄") and "%" in body for body in bodies), bodies  # live
    assert "exit code 2" in failed.current and "it broke" in failed.current
    [attachment] = wait_for(lambda: [
        event for event in room.alice.timeline(room.room)
        if event["sender"] == room.bot and event["content"].get("msgtype") == "m.file"])
    assert attachment["content"]["body"].endswith("-broken.log")

"""The most a log ever shows (`--log-level debug`) of a real service with an encrypted room,
the API and a job: no secret, no key material and no message text reaches it; and what it
does show is worth turning on: our own decisions, one line each (claims and their sizes,
what a sync brought, why an edit waited, which rule refused a command). One run of the
service, read by both tests. Sync gaps and store retries need a gap or a store in trouble:
test_matrix_sync.py and test_store_trouble_logged.py pin those lines."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
import pytest_asyncio
from helpers import bot_tables
from matrix_people import BotMessage, EncryptedPerson
from service_process import child_env

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="module")]

PASSWORD = "debug-bot-password-3141"
API_TOKEN = "api-token-for-the-debug-log-2718"
SECRET_PROSE = "the launch code is swordfish-29914"
# Key material: pickles, Megolm session keys, signatures; event ids ($ + 43) are not secrets.
# A log line: time stamp, level, logger, message (logs.ServiceFormatter).
RECORD = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.]+): (.*)$")
BLOB = re.compile(r"(?<![$A-Za-z0-9+/=_-])[A-Za-z0-9+/]{60,}={0,2}(?![A-Za-z0-9+/=_-])")
STEPS = """
import time
for i in range(1, 4):
    time.sleep(0.3)
    print(f"::progress {i}/3 step {i}", flush=True)
"""


def write_config(directory: Path, homeserver: str, bot: str, alice: str) -> Path:
    (directory / "steps.py").write_text(STEPS)
    config = directory / "config.toml"
    config.write_text(bot_tables(homeserver, bot, alice) + textwrap.dedent(f"""
        [store]
        path = "state/jobs.db"
        [progress]
        interval_ms = 200
        [api]
        listen = "unix:{directory / 'api.sock'}"
        [targets.steps]
        command = [{sys.executable!r}, "steps.py"]
        [targets.guarded]
        command = [{sys.executable!r}, "steps.py"]
        allowed_users = ["@nobody:example.org"]
    """))
    return config


async def reply_to(alice: EncryptedPerson, room: str, bot: str, command: str,
                   final: tuple[str, ...] = ("",), timeout: float = 40.0) -> BotMessage:
    deadline = time.monotonic() + timeout
    while True:
        for message in alice.messages_of(room, bot):
            if message.reply_to == command and message.current.startswith(final):
                return message
        assert time.monotonic() < deadline, f"no reply to {command}"
        await asyncio.sleep(0.2)


async def use_the_service(synapse, tmp_path: Path, bot: str, alice: EncryptedPerson
                          ) -> tuple[list[str], Path]:
    """Commands, prose and API calls against a debug-level service; the texts sent and
    shown in the room, and the log's path."""
    config = write_config(tmp_path, synapse.base_url, bot, alice.user_id)
    log_path = tmp_path / "service.log"
    env = {**child_env(), "MATRIXJOBS_PASSWORD": PASSWORD, "MATRIXJOBS_API_TOKEN": API_TOKEN}
    with open(log_path, "w") as log:
        service = subprocess.Popen(
            [sys.executable, "-m", "matrixjobs", "run", "--config", str(config),
             "--log-level", "debug"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
            stderr=log)
    try:
        room = await alice.create_encrypted_room([bot])
        deadline = time.monotonic() + 40
        while bot not in await asyncio.to_thread(alice.http.members, room):
            assert service.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the bot never joined"
            await asyncio.sleep(0.2)
        await alice.trust(bot)
        texts = [SECRET_PROSE]
        await alice.send(room, SECRET_PROSE)
        build = await alice.send(room, "!build steps")
        done = await reply_to(alice, room, bot, build, final=("✅",))
        status = await alice.send(room, "!jobs")
        listing = await reply_to(alice, room, bot, status)
        guarded = await alice.send(room, "!build guarded")
        refused = await reply_to(alice, room, bot, guarded)
        texts += ["!build steps", *done.bodies, *listing.bodies, "!build guarded",
                  *refused.bodies]

        transport = httpx2.AsyncHTTPTransport(uds=str(tmp_path / "api.sock"))
        async with httpx2.AsyncClient(transport=transport, base_url="http://localhost",
                                      headers={"Authorization": f"Bearer {API_TOKEN}"}
                                      ) as api:
            assert (await api.get("/v1/jobs")).status_code == 200
            assert (await api.get(f"/v1/jobs?access_token={API_TOKEN}")).status_code == 400
            wrong = await api.get("/v1/jobs", headers={"Authorization": f"Bearer {PASSWORD}"})
            assert wrong.status_code == 401
    finally:
        service.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(service.wait, 30) == 0
    return texts, log_path


@dataclass(frozen=True)
class DebugRun:
    directory: Path
    texts: list[str]  # what was said in the room
    log: str


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def debug_run(synapse, tmp_path_factory: pytest.TempPathFactory) -> DebugRun:
    tmp_path = tmp_path_factory.mktemp("debuglog")
    bot = (await asyncio.to_thread(synapse.register, "debuglogbot", PASSWORD))["user_id"]
    alice = await EncryptedPerson.register(synapse, "debuglogalice", tmp_path / "alice")
    try:
        texts, log_path = await use_the_service(synapse, tmp_path, bot, alice)
    finally:
        await alice.close()
    return DebugRun(tmp_path, texts, log_path.read_text())


async def test_a_debug_log_holds_no_secret_no_key_and_no_message_text(debug_run):
    tmp_path, texts, log = debug_run.directory, debug_run.texts, debug_run.log
    assert "matrix: logged in as" in log

    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "jobs.db")) as db:
        [(token,)] = db.execute(
            "SELECT value FROM settings WHERE key = 'matrix.access_token'").fetchall()
    crypto_db = next((tmp_path / "state" / "jobs-crypto").glob("*.db"))
    with contextlib.closing(sqlite3.connect(crypto_db)) as db:
        pickles = [row[0] for row in db.execute("SELECT account FROM accounts")]
        pickles += [row[0] for row in db.execute("SELECT session FROM olmsessions")]
        pickles += [row[0] for row in db.execute("SELECT session FROM megolminboundsessions")]
    pickles = [p.decode() if isinstance(p, bytes) else p for p in pickles]
    assert pickles, "the bot's keys should be in its crypto store"

    pickle_key = (tmp_path / "state" / "jobs.pickle-key").read_text().strip()
    assert len(pickle_key) >= 16
    for secret in [token, PASSWORD, API_TOKEN, pickle_key, *pickles]:
        assert secret not in log
    for text in texts:
        assert text not in log, f"message text in the log: {text!r}"
    assert "swordfish" not in log
    assert BLOB.findall(log) == []


async def test_a_debug_log_says_our_own_decisions_one_line_each(debug_run):
    records = [match.groups() for line in debug_run.log.splitlines()
               if (match := RECORD.match(line))]

    def ours(text: str) -> list[str]:
        return [message for level, name, message in records
                if level == "DEBUG" and name.startswith("matrixjobs.") and text in message]

    # The !build's job claimed, and its outcome settled: sizes, never names or arguments.
    claims = ours("store cycle: claimed ")
    assert any(re.fullmatch(r"store cycle: claimed 1 of \d+ wanted \(\d+ ahead of a free "
                            r"slot\), settled \d+ outcomes, in \d+ ms", claim)
               for claim in claims), claims
    assert any("settled 1 outcomes" in claim for claim in claims), claims
    # What the sync loop brought: the commands' events, by count and room, never their text.
    synced = ours("matrix: sync: ")
    assert synced, debug_run.log
    assert all(re.fullmatch(r"matrix: sync: \d+ new events in !\S+", line) for line in synced)
    # Why the job's progress edits waited, and for how long.
    waits = ours("'s edit waits ")
    assert any(re.fullmatch(r"matrix: j1's edit waits \d+\.\d\ds: interval: edits of a "
                            r"message go 0\.2s apart", line) for line in waits), waits
    # Which rule refused the !build guarded: the rule and the target, never the message.
    assert ours("policy: ") == [
        "policy: run refused to @debuglogalice:localhost via room on guarded (rule "
        "allowed_users: you may not run guarded)"], debug_run.log
    # Library loggers stay held at WARNING: nothing of theirs at debug or info.
    assert not [name for level, name, _ in records
                if level in ("DEBUG", "INFO") and name.split(".")[0] != "matrixjobs"]

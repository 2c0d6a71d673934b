"""What the room and the CLI say while the store is in trouble, the trouble caused for real:
a SQLite store another connection holds write-locked (an operator's `sqlite3` shell in a
transaction), a PostgreSQL server cut off behind a proxy.

A command that would start work gets one short reply (the CLI: exit 1 and the reason);
`!status` and `matrixjobs status` start with the one line that says the store is in
trouble; a store that cannot even be read says so instead of an internal error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
from helpers import make_config, python_target, write_locked
from nio import RoomMessageText
from tcp_proxy import TcpProxy

from matrixjobs.api import ApiServer
from matrixjobs.app import App
from matrixjobs.config import Config
from matrixjobs.errors import StoreUnavailableError
from matrixjobs.matrix.bot import MatrixBot
from matrixjobs.models import ProgressMessage
from matrixjobs.policy import ADMIN, Caller, Via
from matrixjobs.service import build_service

ROOM = "!trouble:example.org"
ALLOWED = "@alice:example.org"
TARGETS = {"plain": python_target("print('ok')")}
LOCKED_REFUSAL = "store: locked: new jobs are refused until it recovers; try again in 10 s"
BANNER = ("Degraded — store: locked. New jobs are refused until the store recovers; "
          "running jobs go on.")
RECOVERS_S = 15.0  # the probe (every 5 s) clears a fault once a write works again
DEGRADED_WITHIN_S = 10.0  # the issue's promise for /healthz, and so for every view


class RecordingSender:
    """Stands in for the homeserver: records every message the bot sends."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, room_id: str, content: dict[str, Any], txn_id: str) -> str:
        self.sent.append(content)
        return f"$sent{len(self.sent)}"


@dataclass
class Room:
    app: App
    bot: MatrixBot
    sender: RecordingSender = field(default_factory=RecordingSender)
    count: int = 0

    async def say(self, body: str) -> list[str]:
        """What the bot answered one message of an allowed user: each message's body."""
        self.count += 1
        event = RoomMessageText.from_dict({
            "type": "m.room.message", "event_id": f"$ask{self.count}", "sender": ALLOWED,
            "origin_server_ts": 1, "content": {"msgtype": "m.text", "body": body}})
        assert isinstance(event, RoomMessageText)
        self.sender.sent.clear()
        await self.bot.callbacks.on_event(ROOM, event)
        await self.bot.scheduler.flush(10.0)
        return [content["body"] for content in self.sender.sent]


def room_config(tmp_path: Path, **store: Any) -> Config:
    return make_config(
        tmp_path, targets=TARGETS, api={"enabled": False}, store=store,
        matrix={"homeserver": "http://127.0.0.1:9", "user_id": "@bot:example.org",
                "rate_per_s": 0},
        access={"allowed_users": [ALLOWED]})


@contextlib.asynccontextmanager
async def room_on(config: Config) -> AsyncIterator[Room]:
    """The bot's event handling on a running App, with no homeserver."""
    assert config.matrix is not None
    app = App(config)
    await app.start()
    bot = MatrixBot(app, config.matrix, config.progress.interval_ms)
    room = Room(app, bot)
    bot.scheduler.sender = room.sender
    try:
        yield room
    finally:
        await bot.client.close()
        await app.stop()


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not {what} within {timeout} s"
        await asyncio.sleep(0.1)


# -- the room ---------------------------------------------------------------------------------


async def test_a_build_while_the_store_is_locked_gets_one_short_reply_and_status_says_so(
        tmp_path):
    config = room_config(tmp_path)
    async with room_on(config) as room:
        async with write_locked(config.store.path):
            # The first write waits out SQLite's busy timeout (5 s), then is refused.
            assert await room.say("!build plain") == [f"⚠️ {LOCKED_REFUSAL}"]
            assert not room.app.health.up
            began = time.monotonic()
            assert await room.say("!batch plain plain") == [f"⚠️ {LOCKED_REFUSAL}"]
            assert time.monotonic() - began < 1, "refused at once while degraded"
            assert await room.say("!status") == [f"⚠️ {BANNER}\nNothing is running."]
        await until(lambda: room.app.health.up, RECOVERS_S, "healthy again")
        assert await room.say("!status") == ["Nothing is running."]
        assert await room.app.jobs() == []  # nothing refused was queued
        [shown] = await room.say("!build plain")
        assert not shown.startswith("⚠️")
        [job] = await room.app.jobs()
        assert job.data["target"] == "plain"


async def test_status_of_one_job_while_degraded_starts_with_the_line(tmp_path):
    config = room_config(tmp_path)
    async with room_on(config) as room:
        job = await room.app.submit("plain")
        async with write_locked(config.store.path):
            await room.say("!build plain")  # refused: the store is marked locked
            [status] = await room.say(f"!status {job.id}")
        first, _, rest = status.partition("\n")
        assert first == f"⚠️ {BANNER}"
        assert job.id in rest


async def test_a_postgresql_store_cut_off_is_said_in_the_room_not_as_an_internal_error(
        tmp_path, pg_url):
    async with TcpProxy("127.0.0.1", 5432) as proxy:
        behind = pg_url.replace(":5432/", f":{proxy.port}/", 1)
        async with room_on(room_config(tmp_path, backend="postgresql", url=behind)) as room:
            assert await room.say("!status") == ["Nothing is running."]
            proxy.cut()
            await until(lambda: not room.app.health.up, DEGRADED_WITHIN_S, "degraded")
            assert await room.say("!status") == ["⚠️ store: unreachable; try again in 10 s"]
            assert await room.say("!build plain") == [
                "⚠️ store: unreachable: new jobs are refused until it recovers; "
                "try again in 10 s"]
            proxy.restore()
            await until(lambda: room.app.health.up, RECOVERS_S, "healthy again")
            assert await room.say("!status") == ["Nothing is running."]



# -- the bot's own records ----------------------------------------------------------------------


async def test_the_bots_own_records_on_a_cut_off_store_fail_at_once(tmp_path, pg_url):
    """Its login and its progress messages are kept through the App: while the store is
    known to be unreachable they say so at once, not after the pool's 30 s wait."""
    async with TcpProxy("127.0.0.1", 5432) as proxy:
        behind = pg_url.replace(":5432/", f":{proxy.port}/", 1)
        async with room_on(room_config(tmp_path, backend="postgresql", url=behind)) as room:
            proxy.cut()
            await until(lambda: not room.app.health.up, DEGRADED_WITHIN_S, "degraded")
            began = time.monotonic()
            with pytest.raises(StoreUnavailableError):
                await room.bot.session.forget_token()
            with pytest.raises(StoreUnavailableError):
                await room.bot.session.login()
            with pytest.raises(StoreUnavailableError):
                await room.bot._restore_messages()
            assert time.monotonic() - began < 1
            proxy.restore()  # the service stops quickly


async def test_the_bot_starts_once_a_store_cut_off_at_its_start_comes_back(
        tmp_path, pg_url, monkeypatch):
    """Restoring the progress messages after a restart is retried like the login, not the
    end of the bot."""
    async with TcpProxy("127.0.0.1", 5432) as proxy:
        behind = pg_url.replace(":5432/", f":{proxy.port}/", 1)
        async with room_on(room_config(tmp_path, backend="postgresql", url=behind)) as room:
            bot = room.bot
            job = await room.app.submit("plain")
            await room.app.save_message(ProgressMessage(job.id, ROOM, "$shown", ALLOWED,
                                                        "$asked"), time.time())

            async def no_homeserver(*_: object, **__: object) -> bool:
                return True

            for step in ("_first_sync", "_upkeep", "_sync_forever"):
                monkeypatch.setattr(bot, step, no_homeserver)
            monkeypatch.setattr(bot.session, "login", no_homeserver)
            proxy.cut()
            await until(lambda: not room.app.health.up, DEGRADED_WITHIN_S, "degraded")
            await bot.start()
            try:
                await asyncio.sleep(1.5)
                assert not bot.synced.is_set() and not bot._tasks[0].done()
                proxy.restore()
                await asyncio.wait_for(bot.ready(), 30)
                # The job ended meanwhile: its message, restored, gets its final edit.
                await until(lambda: any(
                    sent.get("m.relates_to", {}).get("event_id") == "$shown"
                    for sent in room.sender.sent), 10, "the message finished")
            finally:
                await bot._halt()



# -- the dashboard ------------------------------------------------------------------------------


async def test_a_personal_tokens_dashboard_on_a_cut_off_store_says_so_in_the_page(
        tmp_path, pg_url):
    """Whose token it is cannot be read: the login form says why (not a JSON blob), and a
    session already open still gets its page, whose banner says it (from the API's 503)."""
    async with TcpProxy("127.0.0.1", 5432) as proxy:
        behind = pg_url.replace(":5432/", f":{proxy.port}/", 1)
        app = build_service(make_config(
            tmp_path, targets=TARGETS, api={"token": "t" * 32},
            store={"backend": "postgresql", "url": behind},
            access={"allowed_users": [ALLOWED]}))
        await app.start()
        try:
            [api] = [c for c in app.components if isinstance(c, ApiServer)]
            token = await app.issue_token(ALLOWED, "browser", Caller(ADMIN, Via.API))
            origin = {"Origin": api.url.rstrip("/")}
            async with httpx2.AsyncClient(base_url=api.url) as browser:
                opened = await browser.post("/login", data={"token": token}, headers=origin)
                assert opened.status_code == 303
                proxy.cut()
                await until(lambda: not app.health.up, DEGRADED_WITHIN_S, "degraded")
                page = await browser.get("/")
                assert page.status_code == 200, page.text
                assert page.headers["content-type"].startswith("text/html")
                status = await browser.get("/v1/status", headers=origin)
                assert (status.status_code, status.json()["error"]["code"]) == (
                    503, "store_unavailable")
                browser.cookies.clear()
                again = await browser.post("/login", data={"token": token}, headers=origin)
        finally:
            proxy.restore()  # the service stops quickly
            await app.stop()
    assert again.status_code == 503 and again.headers["Retry-After"] == "10"
    assert again.headers["content-type"].startswith("text/html")
    assert ("Personal tokens cannot be checked now: store: unreachable; try again in 10 s."
            in again.text)


# -- the CLI ----------------------------------------------------------------------------------


@dataclass
class Ran:
    code: int
    out: str
    err: str


async def cli(url: str, *args: str) -> Ran:
    """`matrixjobs ARGS…` against the service at `url` (served by this test's loop)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MATRIXJOBS_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "matrixjobs", *args, "--api", url, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


@contextlib.asynccontextmanager
async def service(tmp_path: Path, **store: Any) -> AsyncIterator[tuple[App, str]]:
    app = build_service(make_config(tmp_path, targets=TARGETS, store=store))
    await app.start()
    try:
        [api] = [c for c in app.components if isinstance(c, ApiServer)]
        yield app, api.url
    finally:
        await app.stop()


async def test_the_cli_refuses_to_submit_to_a_locked_store_and_status_says_so(tmp_path):
    async with service(tmp_path) as (app, url):
        async with write_locked(app.config.store.path):
            submit = await cli(url, "submit", "plain")
            assert (submit.code, submit.out) == (1, ""), submit
            assert submit.err == f"error: {LOCKED_REFUSAL} (HTTP 503, store_unavailable)\n"
            status = await cli(url, "status")
            assert (status.code, status.err) == (0, f"{BANNER}\n"), status
            as_json = await cli(url, "status", "--json")
            assert (as_json.code, as_json.out, as_json.err) == (0, "", f"{BANNER}\n")
        await until(lambda: app.health.up, RECOVERS_S, "healthy again")
        status = await cli(url, "status")
        assert (status.code, status.err) == (0, ""), status
        assert (await cli(url, "submit", "plain")).code == 0


async def test_the_cli_says_a_postgresql_store_cut_off_and_exits_1(tmp_path, pg_url):
    async with TcpProxy("127.0.0.1", 5432) as proxy:
        behind = pg_url.replace(":5432/", f":{proxy.port}/", 1)
        async with service(tmp_path, backend="postgresql", url=behind) as (app, url):
            proxy.cut()
            await until(lambda: not app.health.up, DEGRADED_WITHIN_S, "degraded")
            status = await cli(url, "status")
            assert (status.code, status.out) == (1, ""), status
            assert status.err == ("error: store: unreachable; try again in 10 s "
                                  "(HTTP 503, store_unavailable)\n")
            submit = await cli(url, "submit", "plain")
            assert submit.code == 1, submit
            assert submit.err == ("error: store: unreachable: new jobs are refused until it "
                                  "recovers; try again in 10 s (HTTP 503, store_unavailable)\n")
            proxy.restore()
            await until(lambda: app.health.up, RECOVERS_S, "healthy again")
            assert (await cli(url, "submit", "plain")).code == 0

"""`matrixjobs demo`: a throwaway homeserver, the bot, a room and a scripted user.

Everything lives in one temp directory and one process (Synapse is its child):
start Synapse on loopback, register the bot and a demo user, exempt the bot
from the message rate limit, run the service in-process with the demo config,
create a room, have the demo user send a few commands and show the room live.
Whatever ends the demo (the script finishing with --until-done, Ctrl-C,
SIGTERM, SIGHUP, an error), the bot, Synapse and the directory are cleaned up
on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import signal
import tempfile
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import ClientError
from nio import AsyncClient, RoomCreateResponse, RoomPreset, RoomSendResponse, SyncResponse

from matrixjobs.api import ApiServer
from matrixjobs.app import App
from matrixjobs.demo.config import read_demo_config, write_demo_config
from matrixjobs.demo.synapse import SynapseServer
from matrixjobs.demo.view import Display, RoomView
from matrixjobs.errors import MatrixJobsError
from matrixjobs.exitcodes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from matrixjobs.logs import quiet_libraries, service_handler
from matrixjobs.service import build_service

log = logging.getLogger(__name__)
C = TypeVar("C")

BOT_NAME = "matrixjobs"
USER_NAME = "demo"
ROOM_NAME = "matrixjobs demo"
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
READY_TIMEOUT_S = 60.0
COMMAND_GAP_S = 2.0
SCRIPT_WAIT_S = 90.0  # without --until-done: then print the login info anyway
SYNC_TIMEOUT_MS = 30_000
# Job/batch messages start with their state's emoji; the rest are one-off answers.
RUNNING = ("⏳", "🔄")


class DemoError(MatrixJobsError):
    """The demo could not be set up or did not get where it should."""


@dataclass(frozen=True, slots=True)
class Scripted:
    """A command the demo user sends, and the state its message should end in."""

    text: str
    expected: str


SCRIPT = (
    Scripted("!build docs", "✅"),
    Scripted("!batch api site", "✅"),
    Scripted("!build lint", "❌"),  # fails on purpose: shows ❌ and the output tail
)


@dataclass(frozen=True, slots=True)
class Options:
    until_done: bool
    timeout_s: float
    keep: bool


@dataclass(frozen=True, slots=True)
class Account:
    user_id: str
    password: str
    access_token: str
    device_id: str


async def run_demo(options: Options, display: Display) -> int:
    """The whole demo; SIGINT/SIGTERM/SIGHUP end it cleanly (more of them are ignored)."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    demo = Demo(options, display)
    signalled: list[int] = []

    def on_signal(signum: int) -> None:
        # Once cleanup has begun, let it finish: Synapse and the directory must go.
        if not signalled and not demo.closing:
            display.note(f"{signal.Signals(signum).name}: stopping the demo…")
            main.cancel()
        signalled.append(signum)

    for sig in SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await demo.run()
    except asyncio.CancelledError:
        if not signalled:
            raise
        return EXIT_INTERRUPTED if options.until_done else EXIT_OK
    finally:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)


class Demo:
    def __init__(self, options: Options, display: Display) -> None:
        self.options = options
        self.display = display
        self.directory = Path(tempfile.mkdtemp(prefix="matrixjobs-demo-"))
        self.synapse = SynapseServer(rate_limits=True, base_dir=self.directory / "synapse")
        self.view: RoomView | None = None
        self._changed = asyncio.Condition()
        self.closing = False

    async def run(self) -> int:
        cleanup = AsyncExitStack()
        cleanup.callback(self._remove_directory)
        try:
            if not self.options.until_done:
                return await self._play(cleanup)
            try:
                async with asyncio.timeout(self.options.timeout_s):
                    outcome = await self._play(cleanup)
            except TimeoutError:
                self.display.note(
                    f"error: the demo did not finish within {self.options.timeout_s:.0f} s")
                outcome = EXIT_FAILED
            if outcome != EXIT_OK:
                self.display.note(self._log_tail())
            return outcome
        except DemoError:
            self.display.note(self._log_tail())  # the directory, and the log, are going away
            raise
        finally:
            self.closing = True
            await cleanup.aclose()
            self.display.note("Stopped the bot and Synapse"
                              + ("." if self.options.keep else f"; removed {self.directory}."))

    async def _play(self, cleanup: AsyncExitStack) -> int:
        self._log_to_file()
        say = self.display.note
        say(f"Starting a throwaway Synapse on {self.synapse.base_url} (in {self.directory})…")
        bot, user = await self._start_homeserver(cleanup)
        say(f"Synapse is up; registered the bot {bot.user_id} (exempt from the message "
            f"rate limit) and the demo user {user.user_id}.")
        app = await self._start_service(cleanup, bot, user)
        client = await self._demo_client(cleanup, user)
        room_id = await self._open_room(cleanup, client, bot.user_id)
        sent = await self._send_script(client, room_id)
        if self.options.until_done:
            return await self._finish(sent)
        try:
            await asyncio.wait_for(self._finish(sent), SCRIPT_WAIT_S)
        except TimeoutError:
            say(f"The scripted commands did not finish within {SCRIPT_WAIT_S:.0f} s; "
                f"see {self.directory / 'matrixjobs.log'}.")
        say(self._login_info(user, room_id, app))
        await asyncio.Event().wait()  # until a signal cancels us
        return EXIT_OK  # not reached

    # -- setup --------------------------------------------------------------------------------

    def _log_to_file(self) -> None:
        """The service's log goes to a file: the terminal shows the room."""
        path = self.directory / "matrixjobs.log"
        root = logging.getLogger()
        root.addHandler(service_handler(logging.FileHandler(path, encoding="utf-8")))
        root.setLevel(logging.INFO)
        quiet_libraries()

    async def _start_homeserver(self, cleanup: AsyncExitStack) -> tuple[Account, Account]:
        # Blocking harness calls run in a thread that a signal must not abandon halfway:
        # Synapse could be spawned after we stopped it. Cleanup waits for the thread first.
        setup = asyncio.ensure_future(asyncio.to_thread(self._homeserver_accounts))

        async def stop_synapse() -> None:
            with contextlib.suppress(Exception):
                await setup
            await asyncio.to_thread(self.synapse.close)

        cleanup.push_async_callback(stop_synapse)
        return await asyncio.shield(setup)

    def _homeserver_accounts(self) -> tuple[Account, Account]:
        self.synapse.start()
        bot, user = (self._register(name) for name in (BOT_NAME, USER_NAME))
        self.synapse.exempt_from_rate_limit(bot.user_id)
        return bot, user

    def _register(self, name: str) -> Account:
        password = secrets.token_urlsafe(9)
        account = self.synapse.register(name, password)
        return Account(account["user_id"], password, account["access_token"],
                       account["device_id"])

    async def _start_service(self, cleanup: AsyncExitStack, bot: Account, user: Account) -> App:
        path = write_demo_config(self.directory, self.synapse.base_url, bot.user_id,
                                 user.user_id)
        app = build_service(read_demo_config(path, bot.access_token))
        cleanup.push_async_callback(app.stop)
        await app.start()
        try:
            await asyncio.wait_for(app.ready(), READY_TIMEOUT_S)
        except TimeoutError:
            raise DemoError(f"the bot did not log in within {READY_TIMEOUT_S:.0f} s") from None
        self.display.note(f"The bot is running with {path} (its API on "
                          f"{self._component(app, ApiServer).url}).")
        return app

    @staticmethod
    def _component(app: App, kind: type[C]) -> C:
        return next(c for c in app.components if isinstance(c, kind))

    async def _demo_client(self, cleanup: AsyncExitStack, user: Account) -> AsyncClient:
        client = AsyncClient(self.synapse.base_url, user.user_id)
        client.restore_login(user.user_id, user.device_id, user.access_token)
        cleanup.push_async_callback(client.close)
        return client

    async def _open_room(self, cleanup: AsyncExitStack, client: AsyncClient,
                         bot_id: str) -> str:
        """Create the room, invite the bot, show the room live, wait until the bot is in."""
        response = await client.room_create(
            name=ROOM_NAME, topic="Try !help, !build docs, !batch docs api site, !status",
            preset=RoomPreset.private_chat, invite=[bot_id])
        if not isinstance(response, RoomCreateResponse):
            raise DemoError(f"cannot create the demo room: {response}")
        self.view = RoomView(response.room_id)
        self.display.start(f"{ROOM_NAME} ({response.room_id})")
        cleanup.callback(self.display.stop)
        follower = asyncio.create_task(self._follow(client), name="demo-room")
        cleanup.push_async_callback(_cancel, follower)
        try:
            await asyncio.wait_for(self._until(lambda view: view.joined(bot_id)),
                                   READY_TIMEOUT_S)
        except TimeoutError:
            raise DemoError(f"the bot did not join within {READY_TIMEOUT_S:.0f} s") from None
        return str(response.room_id)

    # -- the room -----------------------------------------------------------------------------

    async def _follow(self, client: AsyncClient) -> None:
        """The demo user's sync loop: every new event into the view and onto the screen."""
        assert self.view is not None
        sync_filter = {"room": {"timeline": {"limit": 100}}}
        while True:
            try:
                response = await client.sync(timeout=SYNC_TIMEOUT_MS, sync_filter=sync_filter)
            except (ClientError, OSError, TimeoutError) as exc:
                response = exc
            if not isinstance(response, SyncResponse):
                log.warning("demo: sync failed: %s", response)
                await asyncio.sleep(1)
                continue
            room = response.rooms.join.get(self.view.room_id)
            for event in room.timeline.events if room else []:
                changed = self.view.apply(event.source)
                if changed is not None:
                    self.display.show(self.view, changed)
            async with self._changed:
                self._changed.notify_all()

    async def _until(self, done: Callable[[RoomView], bool]) -> None:
        assert self.view is not None
        view = self.view
        async with self._changed:
            await self._changed.wait_for(lambda: done(view))

    # -- the script ---------------------------------------------------------------------------

    async def _send_script(self, client: AsyncClient, room_id: str) -> list[tuple[str, str]]:
        """Send the scripted commands a moment apart; (event id, command) of each."""
        sent = []
        for number, command in enumerate(SCRIPT):
            if number:
                await asyncio.sleep(COMMAND_GAP_S)
            response = await client.room_send(
                room_id, "m.room.message", {"msgtype": "m.text", "body": command.text})
            if not isinstance(response, RoomSendResponse):
                raise DemoError(f"cannot send {command.text!r}: {response}")
            sent.append((str(response.event_id), command.text))
        return sent

    async def _finish(self, sent: list[tuple[str, str]]) -> int:
        """Wait until every scripted command's message reached a final state; compare."""
        def final(view: RoomView) -> bool:
            replies = [view.reply_to(event_id) for event_id, _ in sent]
            return all(r is not None and not r.body.startswith(RUNNING) for r in replies)

        await self._until(final)
        assert self.view is not None
        ok = True
        for (event_id, text), command in zip(sent, SCRIPT, strict=True):
            reply = self.view.reply_to(event_id)
            assert reply is not None
            got = reply.body.split(maxsplit=1)[0]
            ok = ok and got == command.expected
            self.display.note(f"{text}: {got} (expected {command.expected})")
        self.display.note("The scripted commands ended as expected." if ok else
                          "error: a scripted command did not end as expected.")
        return EXIT_OK if ok else EXIT_FAILED

    def _login_info(self, user: Account, room_id: str, app: App) -> str:
        api = self._component(app, ApiServer).url
        return "\n".join([
            "",
            "The demo keeps running. Log in with any Matrix client (e.g. Element: Sign in →",
            "edit the homeserver) to watch the room and try commands yourself:",
            f"  homeserver  {self.synapse.base_url}",
            f"  user        {USER_NAME}   ({user.user_id})",
            f"  password    {user.password}",
            f"  room        {ROOM_NAME}   ({room_id})",
            "  commands    !help · !targets · !build docs · !batch docs api site lint · "
            "!status · !jobs · !logs ID · !rerun ID · !cancel ID (or react ❌ / 🔁)",
            f"In a browser: the dashboard at {api}/",
            f"From a shell: matrixjobs status --watch --api {api}",
            f"The bot is exempt from Synapse's message rate limit, so its edits follow the "
            f"progress every {app.config.progress.interval_ms} ms; the demo user keeps "
            "Synapse's default limit.",
            f"Config and logs: {self.directory}. Ctrl-C stops the demo and "
            + ("keeps that directory." if self.options.keep else "deletes it."),
        ])

    def _log_tail(self, lines: int = 30) -> str:
        """The end of the service's log, for a failed --until-done run (the log is deleted)."""
        path = self.directory / "matrixjobs.log"
        try:
            tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no service log)"
        return "\n".join([f"--- the last lines of {path} ---", *tail])

    def _remove_directory(self) -> None:
        if self.options.keep:
            self.display.note(f"Kept {self.directory} (config, store, logs, Synapse's data).")
        else:
            shutil.rmtree(self.directory, ignore_errors=True)


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

"""The Matrix bot's session and sync loop: it logs in (session.py), syncs, joins rooms it
is invited to, and hands each new message or reaction to callbacks.py, which turns it into
a room command (room_commands.py). Every message it shows goes through the edit scheduler,
which owns the send budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from nio import (
    AsyncClient,
    AsyncClientConfig,
    ErrorResponse,
    InviteMemberEvent,
    JoinResponse,
    LocalProtocolError,
    MegolmEvent,
    MessageDirection,
    ReactionEvent,
    RoomMemberEvent,
    RoomMessagesResponse,
    RoomMessageText,
    SyncResponse,
)

from matrixjobs.app import App
from matrixjobs.config import MatrixConfig
from matrixjobs.errors import MatrixJobsError, StoreUnavailableError
from matrixjobs.matrix.callbacks import Callbacks
from matrixjobs.matrix.crypto import Crypto, Trust, session_key
from matrixjobs.matrix.crypto_store import PrivateStore
from matrixjobs.matrix.edits import EditScheduler, Pings
from matrixjobs.matrix.places import RoomStateError
from matrixjobs.matrix.ratelimit import TokenBucket
from matrixjobs.matrix.render import render_progress
from matrixjobs.matrix.sender import NETWORK_ERRORS, PERMANENT_ERRORS, NioSender
from matrixjobs.matrix.session import Session
from matrixjobs.models import ProgressMessage
from matrixjobs.progress.subscription import Subscription
from matrixjobs.supervisor import Supervisor, cancel_all

log = logging.getLogger(__name__)

SYNC_TIMEOUT_MS = 30_000
# Room timelines of up to 50 events per sync; a longer gap is fetched with /messages.
SYNC_FILTER = {"room": {"timeline": {"limit": 50}}}
GAP_LIMIT = 200
MAX_BACKOFF_S = 60.0
# How often the store is asked for work that a webhook or schedule started, whatever woke
# the bot. Its progress events wake it at once: work queued here, and (PostgreSQL) work
# another node queued, which the remote feed publishes as soon as the store announces it.
# This look only covers announcements lost while the listener reconnected (work the feed's
# full read finds waiting is not published): rare enough that 5 s, the feed's own period
# (remote.RESYNC_S), is soon enough.
UNSENT_EVERY_S = 5.0
# At shutdown, how long the last states may take to send (daemon.STOP_SLACK_S covers it).
FLUSH_S = 10.0


class MatrixBot:
    """A service component: `start()` returns at once; login and sync retry in the background."""

    def __init__(self, app: App, config: MatrixConfig, interval_ms: int) -> None:
        self.app = app
        self.config = config
        store_dir = config.crypto_store_dir(app.config.store.path)
        self.client = AsyncClient(
            config.homeserver, config.user_id, store_path=str(store_dir),
            # We pace and retry ourselves: nio must hand back 429s and network errors.
            # The pickle key is set once it is known (Session._open_crypto_store).
            config=AsyncClientConfig(max_limit_exceeded=0, max_timeouts=0, request_timeout=60,
                                     encryption_enabled=True, store=PrivateStore),
        )
        self.crypto = Crypto(self.client, Trust(config.trust), config.decrypt_timeout_s,
                             config.pinned_devices())
        sender = NioSender(self.client, self.crypto)
        self.scheduler = EditScheduler(
            sender, app, TokenBucket(config.rate_per_s, config.rate_burst),
            interval_ms / 1000, config.max_edits_per_message,
            Pings(config.ping, config.notify_after_s, app.previous_outcome),
            render=functools.partial(render_progress, prefix=config.command_prefix),
            counter=app.metrics,
            load_log=app.log,
        )
        self.session = Session(app, config, self.client, self.crypto, store_dir,
                               config.pickle_key_file(app.config.store.path))
        self.callbacks = Callbacks(app, config, self.session, self.crypto, self.scheduler)
        self.synced = asyncio.Event()
        self._known_rooms: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._handling: set[asyncio.Task[Any]] = set()
        self._supervisor = Supervisor()
        self._events: Subscription | None = None
        self._unsent = asyncio.Event()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        # Subscribed before anything is restored, so no state change falls in between.
        self._events = self.app.monitor.subscribe()
        self._tasks.append(asyncio.create_task(self._main(), name="matrix-bot"))

    async def ready(self) -> None:
        await self.synced.wait()

    async def stop(self) -> None:
        """Called once the queue has stopped: the states left to show are final (or
        requeued), so send them now rather than after the next start."""
        await self._halt()
        if self._events is not None:
            if self.synced.is_set():
                for event in self._events.take_all():
                    if self.scheduler.tracks(event.id):
                        self.scheduler.update(event)
                left = await self.scheduler.flush(FLUSH_S)
                if left:
                    log.warning("matrix: %d messages or replies not sent before stopping; "
                                "the messages are brought up to date after the next start",
                                left)
            self._events.close()
        await self.client.close()

    async def drop(self) -> None:
        """Stop without sending anything more: another node took over the bot (see
        standby.py), and it brings the messages up to date from the store."""
        await self._halt()
        if self._events is not None:
            self._events.close()
        await self.client.close()

    async def _halt(self) -> None:
        await cancel_all([*self._tasks, *self._handling])
        await self._supervisor.stop()
        self._tasks.clear()

    async def _main(self) -> None:
        await self._retry("login", self.session.login)
        await self._retry("first sync", self._first_sync)
        # Our device keys go up before anyone is told we are ready; devices are judged
        # again under the configured trust.
        await self._upkeep(recheck=True)
        await self._retry("restoring progress messages", self._restore_messages)
        for room in self.config.rooms:
            self._join_soon(room)
        self.synced.set()
        log.info("matrix: logged in as %s (device %s, session key %s), in %d rooms",
                 self.client.user_id, self.client.device_id, session_key(self.client),
                 len(self.client.rooms))
        self._supervisor.keep("matrix-sync", self._sync_forever)
        self._supervisor.keep("matrix-edits", self.scheduler.run)
        self._supervisor.keep("matrix-progress", self._follow_progress)
        self._supervisor.keep("matrix-triggered", self._show_unsent)
        self._supervisor.keep("matrix-undecryptable", self.callbacks.answer_undecryptable)

    async def _retry(self, what: str, step: Callable[[], Awaitable[bool]]) -> None:
        """Run `step` until it returns True, backing off while the homeserver is away."""
        delay = 1.0
        while True:
            try:
                if await step():
                    return
            except (*NETWORK_ERRORS, StoreUnavailableError) as exc:
                log.warning("matrix: %s failed (%s); retrying in %.0fs", what, exc, delay)
            except Exception:  # an odd answer must not end the bot for good
                log.exception("matrix: %s failed; retrying in %.0fs", what, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)

    # -- login ------------------------------------------------------------------------------

    # -- syncing ----------------------------------------------------------------------------

    async def _first_sync(self) -> bool:
        """Learn where "now" is. Old messages are never acted on; pending invites are."""
        # Synapse caches each sync response for a while, keyed by the request: an initial
        # sync identical to the previous run's (same device, no `since`) would be answered
        # with that run's stale response. A timeout that differs per run avoids it.
        response = await self.client.sync(
            timeout=1 + time.time_ns() // 1_000_000 % 997, full_state=True,
            sync_filter={"room": {"timeline": {"limit": 1}}})
        if not isinstance(response, SyncResponse):
            log.warning("matrix: first sync failed: %s", response)
            return False
        self._known_rooms.update(response.rooms.join)
        self._handle_invites(response)
        return True

    async def _sync_forever(self) -> None:
        delay = 1.0
        while True:
            since = self.client.next_batch
            try:
                response = await self.client.sync(timeout=SYNC_TIMEOUT_MS, since=since,
                                                  sync_filter=SYNC_FILTER)
            except NETWORK_ERRORS as exc:
                response = exc
            if isinstance(response, SyncResponse):
                delay = 1.0
                await self._handle_sync(response, since)
                await self._upkeep()
                continue
            if isinstance(response, ErrorResponse) and response.status_code == "M_UNKNOWN_TOKEN":
                log.warning("matrix: the access token was revoked; logging in again")
                await self.session.forget_token()
                await self._retry("login", self.session.login)
                continue
            log.warning("matrix: sync failed (%s); retrying in %.0fs", response, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)

    async def _handle_sync(self, response: SyncResponse, since: str | None) -> None:
        self._handle_invites(response)
        self._known_rooms.difference_update(response.rooms.leave)
        for room_id, info in response.rooms.join.items():
            try:
                events = await self._new_events(room_id, info.timeline, since)
            except Exception:
                log.exception("matrix: reading the timeline of %s failed", room_id)
                continue
            for event in events:
                if isinstance(event, RoomMessageText | ReactionEvent):
                    self._handle_soon(room_id, event)
                elif isinstance(event, MegolmEvent) and self.session.is_new(event):
                    await self._undecryptable_new(room_id, event)

    async def _undecryptable_new(self, room_id: str, event: MegolmEvent) -> None:
        try:
            await self.crypto.undecryptable(room_id, event)
        except NETWORK_ERRORS as exc:
            # The sync's position has moved on: the rest of this batch must still be read.
            log.warning("matrix: asking for the room key of %s failed (%s); it waits for its "
                        "key all the same", event.event_id, exc)

    def _handle_soon(self, room_id: str, event: RoomMessageText | ReactionEvent) -> None:
        # Its own task: a slow command (a cancel waiting for a process to die) must not
        # hold up the sync loop.
        task = asyncio.create_task(self.callbacks.on_event(room_id, event))
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)

    async def _upkeep(self, recheck: bool = False) -> None:
        """Keys after a sync; then the commands whose room key has come meanwhile."""
        try:
            if recheck:
                self.crypto.recheck()
            await self.crypto.upkeep()
        except (*NETWORK_ERRORS, LocalProtocolError) as exc:
            log.warning("matrix: key upkeep failed (%s); trying again after the next sync", exc)
        for room_id, event in self.crypto.decrypt_pending():
            if isinstance(event, RoomMessageText | ReactionEvent):
                self._handle_soon(room_id, event)

    async def _new_events(self, room_id: str, timeline: Any, since: str | None) -> list[Any]:
        """The timeline events to act on: never history from before our (latest) join."""
        events = list(timeline.events)
        if timeline.limited and since and room_id in self._known_rooms:
            log.debug("matrix: sync gap in %s (a limited timeline of %d events): fetching "
                      "what it left out", room_id, len(events))
            events = await self._fill_gap(room_id, timeline.prev_batch, since) + events
        elif events:
            log.debug("matrix: sync: %d new events in %s", len(events), room_id)
        for index in range(len(events) - 1, -1, -1):
            event = events[index]
            if (isinstance(event, RoomMemberEvent) and event.state_key == self.client.user_id
                    and event.membership == "join"):
                self._known_rooms.add(room_id)
                if index:
                    log.debug("matrix: joined %s: ignoring the %d events before our join",
                              room_id, index)
                return events[index + 1:]
        if room_id not in self._known_rooms and events:
            log.debug("matrix: ignoring %d events in %s from before our join",
                      len(events), room_id)
        return events if room_id in self._known_rooms else []

    async def _fill_gap(self, room_id: str, start: str, since: str) -> list[Any]:
        """The events a limited sync left out (e.g. after an outage), oldest first."""
        response = await self.client.room_messages(
            room_id, start=start, end=since, direction=MessageDirection.back, limit=GAP_LIMIT)
        if not isinstance(response, RoomMessagesResponse):
            log.warning("matrix: cannot fetch missed messages in %s: %s", room_id, response)
            return []
        log.debug("matrix: caught up in %s: %d missed events fetched (at most %d)", room_id,
                  len(response.chunk), GAP_LIMIT)
        return list(reversed(response.chunk))

    def _handle_invites(self, response: SyncResponse) -> None:
        for room_id, info in response.rooms.invite.items():
            inviter = next((e.sender for e in info.invite_state
                            if isinstance(e, InviteMemberEvent)
                            and e.state_key == self.client.user_id
                            and e.membership == "invite"), None)
            if inviter is not None and self.app.policy.known(inviter):
                log.info("matrix: %s invited us to %s; joining", inviter, room_id)
                self._join_soon(room_id)
            else:
                log.info("matrix: ignoring invite to %s from %s (not allowed)", room_id, inviter)

    def _join_soon(self, room: str) -> None:
        """Join in the background, retrying: a slow (federated) join must not hold anything up."""
        task = asyncio.create_task(self._retry(f"joining {room}", lambda: self._join(room)))
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)

    async def _join(self, room: str) -> bool:
        self.scheduler.bucket.take()  # Synapse counts joins against the message rate too
        response = await self.client.join(room)
        if isinstance(response, JoinResponse):
            return True
        log.warning("matrix: cannot join %s: %s", room, response)
        return response.status_code in PERMANENT_ERRORS  # give up on those

    # -- progress ---------------------------------------------------------------------------

    async def _restore_messages(self) -> bool:
        """After a restart, keep editing the messages of unfinished work (and finish them).
        A store in trouble raises StoreUnavailableError, for `_retry` to try again."""
        for message in await self.app.open_messages():
            try:
                state = await self.app.status(message.subject_id)
            except StoreUnavailableError:
                raise  # the store in trouble, not the work gone: its message stays open
            except MatrixJobsError:
                await self.app.update_message(message.subject_id, message.edits, True)
                continue
            self.scheduler.restore(message, state)
        return True

    async def _follow_progress(self) -> None:
        assert self._events is not None
        async for event in self._events:
            if self.scheduler.tracks(event.id):
                self.scheduler.update(event)
            elif event.trigger is not None:
                # Ended too: work another node ran may be heard of first at its end.
                self._unsent.set()

    async def _show_unsent(self) -> None:
        """Post the progress message of work a webhook or schedule started, whichever node
        queued it: the store says where, and that no bot has sent it yet."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._unsent.wait(), UNSENT_EVERY_S)
            self._unsent.clear()
            try:
                for message in await self.app.unsent_messages():
                    if not self.scheduler.tracks(message.subject_id):
                        await self._show_in(message)
            except StoreUnavailableError as exc:
                log.debug("matrix: triggered work waits to be shown: %s", exc)

    async def _show_in(self, message: ProgressMessage) -> None:
        try:
            room_id = await self._room_to_show_in(message.room_id)
        except (RoomStateError, *NETWORK_ERRORS) as exc:
            log.warning("matrix: cannot show %s in %s yet (%s)", message.subject_id,
                        message.room_id, exc)
            return
        if room_id is None:
            log.warning("matrix: cannot show %s in %s: the bot cannot join it",
                        message.subject_id, message.room_id)
            await self.app.update_message(message.subject_id, 0, True)
            return
        try:
            state = await self.app.status(message.subject_id)
        except StoreUnavailableError:
            raise
        except MatrixJobsError:  # gone meanwhile (retention)
            await self.app.update_message(message.subject_id, 0, True)
            return
        if not self.scheduler.tracks(message.subject_id):  # a restore may have come meanwhile
            self.scheduler.restore(replace(message, room_id=room_id), state)

    async def _room_to_show_in(self, room: str) -> str | None:
        """The id of a configured room (or alias) the bot is in, joining it if need be;
        None if it cannot be joined."""
        room_id = await self.callbacks.places.resolve(room) if room.startswith("#") else room
        if room_id is None or room_id in self.client.rooms:
            return room_id
        self.scheduler.bucket.take()
        return room_id if isinstance(await self.client.join(room_id), JoinResponse) else None



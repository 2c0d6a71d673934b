"""The Matrix bot: login, sync loop, invites, and room commands.

It turns commands into calls on the core's public API (`App`) and hands every
message it wants to show to the edit scheduler, which owns the send budget.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from email.utils import parsedate_to_datetime
from typing import Any

from aiohttp import ClientError
from nio import (
    Api,
    AsyncClient,
    AsyncClientConfig,
    EncryptionError,
    ErrorResponse,
    GroupEncryptionError,
    InviteMemberEvent,
    JoinResponse,
    LocalProtocolError,
    LoginResponse,
    MegolmEvent,
    MessageDirection,
    OlmTrustError,
    ReactionEvent,
    RoomMemberEvent,
    RoomMessagesResponse,
    RoomMessageText,
    RoomSendResponse,
    SyncResponse,
    UploadResponse,
    WhoamiResponse,
)

from matrixjobs.app import App
from matrixjobs.config import AccessConfig, MatrixConfig
from matrixjobs.errors import AlreadyFinishedError, AlreadySubmittedError, MatrixJobsError
from matrixjobs.fleet import worker_state
from matrixjobs.logs import mask
from matrixjobs.matrix import render
from matrixjobs.matrix.commands import Command, CommandSyntaxError, parse
from matrixjobs.matrix.crypto import (
    Crypto,
    ServerKeys,
    Trust,
    Undecryptable,
    open_store_dir,
    session_key,
)
from matrixjobs.matrix.crypto_store import (
    PICKLE_KEY_ENV,
    CryptoStoreError,
    PickleKeyError,
    PrivateStore,
    load_pickle_key,
)
from matrixjobs.matrix.edits import EditScheduler, Pings, RateLimitedError, SendFailedError
from matrixjobs.matrix.ratelimit import TokenBucket
from matrixjobs.models import Batch, Job, ProgressMessage
from matrixjobs.progress.events import event_of
from matrixjobs.progress.subscription import Subscription
from matrixjobs.supervisor import Supervisor

log = logging.getLogger(__name__)

SYNC_TIMEOUT_MS = 30_000
# Room timelines of up to 50 events per sync; a longer gap is fetched with /messages.
SYNC_FILTER = {"room": {"timeline": {"limit": 50}}}
GAP_LIMIT = 200
DENIED_REPLY_EVERY_S = 300.0
MAX_BACKOFF_S = 60.0
# At shutdown, how long the last states may take to send (daemon.STOP_SLACK_S covers it).
FLUSH_S = 10.0
PERMANENT_ERRORS = frozenset({"M_FORBIDDEN", "M_NOT_FOUND", "M_TOO_LARGE", "M_BAD_JSON"})
SETTING_USER = "matrix.user_id"
SETTING_DEVICE = "matrix.device_id"
SETTING_TOKEN = "matrix.access_token"
# + a device id: which node's device it is, with a shared store (hot standby)
SETTING_DEVICE_OF = "matrix.device_node."
NETWORK_ERRORS = (ClientError, TimeoutError, OSError)
# Raised by nio while encrypting (a device not yet judged, members not loaded): try again.
CRYPTO_ERRORS = (LocalProtocolError, EncryptionError, GroupEncryptionError, OlmTrustError)
# Commands that start or stop work: only allowed users may give them.
GUARDED = frozenset({"build", "batch", "rerun", "cancel", "logs"})
# Reactions on a progress message that act on its job or batch. Clients send the emoji
# with or without the emoji presentation selector (U+FE0F); both count.
CANCEL_KEY, RERUN_KEY = "❌", "🔁"
EMOJI_SELECTOR = "\ufe0f"


class NioSender:
    """Sends through matrix-nio, turning its error responses into exceptions once."""

    def __init__(self, client: AsyncClient, crypto: Crypto) -> None:
        self.client = client
        self.crypto = crypto

    async def send(self, room_id: str, content: dict[str, Any], txn_id: str) -> str:
        # In an encrypted room nio encrypts (each attempt differently) and copies
        # m.relates_to to the cleartext; the homeserver still dedupes on the txn id.
        if room_id not in self.client.rooms:
            # Left (e.g. kicked while we were down): nio refuses locally, and retrying
            # would hold back every other room's messages.
            raise SendFailedError(f"not in room {room_id}", permanent=True)
        try:
            await self.crypto.prepare_room(room_id)
            response = await self.client.room_send(
                room_id, "m.room.message", content, tx_id=txn_id,
                ignore_unverified_devices=self.crypto.ignore_unverified_devices)
        except (*NETWORK_ERRORS, *CRYPTO_ERRORS) as exc:
            raise SendFailedError(f"{type(exc).__name__}: {exc}") from None
        if isinstance(response, RoomSendResponse):
            return str(response.event_id)
        assert isinstance(response, ErrorResponse)
        if response.status_code == "M_LIMIT_EXCEEDED" or _http_status(response) == 429:
            raise RateLimitedError(_retry_after_s(response))
        raise SendFailedError(str(response), permanent=response.status_code in PERMANENT_ERRORS)


    async def upload(self, room_id: str, data: bytes, filename: str,
                     content_type: str) -> dict[str, Any]:
        room = self.client.rooms.get(room_id)
        if room is None:
            raise SendFailedError(f"not in room {room_id}", permanent=True)
        try:
            response, keys = await self.client.upload(
                lambda *_: data, content_type=content_type, filename=filename,
                encrypt=room.encrypted, filesize=len(data))
        except NETWORK_ERRORS as exc:
            raise SendFailedError(f"{type(exc).__name__}: {exc}") from None
        if isinstance(response, UploadResponse):
            if keys is None:
                return {"url": response.content_uri}
            return {"file": {"url": response.content_uri, "mimetype": content_type, **keys}}
        assert isinstance(response, ErrorResponse)
        if response.status_code == "M_LIMIT_EXCEEDED" or _http_status(response) == 429:
            raise RateLimitedError(_retry_after_s(response))
        raise SendFailedError(str(response), permanent=response.status_code in PERMANENT_ERRORS)


def _server_time_ms(response: Any) -> int:
    """The homeserver's clock from a response's Date header (1 s resolution), minus 1 s."""
    transport = getattr(response, "transport_response", None)
    header = transport.headers.get("Date") if transport is not None else None
    try:
        return int(parsedate_to_datetime(header).timestamp() * 1000) - 1000 if header else 0
    except (TypeError, ValueError):
        return 0


def _http_status(response: ErrorResponse) -> int | None:
    transport = getattr(response, "transport_response", None)
    return getattr(transport, "status", None)


def _retry_after_s(response: ErrorResponse) -> float:
    """`retry_after_ms` in the body, else the `Retry-After` header (spec v1.10+), else 5 s."""
    if response.retry_after_ms:
        return response.retry_after_ms / 1000
    transport = getattr(response, "transport_response", None)
    header = transport.headers.get("Retry-After") if transport is not None else None
    try:
        return float(header) if header else 5.0
    except ValueError:
        return 5.0


class MatrixBot:
    """A service component: `start()` returns at once; login and sync retry in the background."""

    def __init__(self, app: App, config: MatrixConfig, access: AccessConfig,
                 interval_ms: int) -> None:
        self.app = app
        self.config = config
        self.access = access
        self.store_dir = config.crypto_store_dir(app.config.store.path)
        self.key_file = config.pickle_key_file(app.config.store.path)
        self.client = AsyncClient(
            config.homeserver, config.user_id, store_path=str(self.store_dir),
            # We pace and retry ourselves: nio must hand back 429s and network errors.
            # The pickle key is set once it is known (_open_crypto_store).
            config=AsyncClientConfig(max_limit_exceeded=0, max_timeouts=0, request_timeout=60,
                                     encryption_enabled=True, store=PrivateStore),
        )
        self._key_source = ""
        self.crypto = Crypto(self.client, Trust(config.trust), config.decrypt_timeout_s,
                             config.pinned_devices())
        sender = NioSender(self.client, self.crypto)
        self.scheduler = EditScheduler(
            sender, app.store, TokenBucket(config.rate_per_s, config.rate_burst),
            interval_ms / 1000, config.max_edits_per_message,
            Pings(config.ping, config.notify_after_s, app.previous_outcome),
            counter=app.metrics,
            load_log=app.log,
        )
        self.synced = asyncio.Event()
        # The homeserver's clock when we started: older messages are never acted on.
        self._started_ms = 0
        self._known_rooms: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._handling: set[asyncio.Task[Any]] = set()
        self._supervisor = Supervisor()
        self._events: Subscription | None = None
        self._denied_at: dict[str, float] = {}
        self._undecryptable_at: dict[str, float] = {}
        self._untrusted_at: dict[str, float] = {}
        self._commands: dict[str, Callable[[str, RoomMessageText, Command], Awaitable[None]]] = {
            "build": self._build, "batch": self._batch, "rerun": self._rerun,
            "status": self._status, "cancel": self._cancel, "jobs": self._jobs,
            "targets": self._targets, "help": self._help, "logs": self._logs,
            "workers": self._workers,
        }

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
        tasks = [*self._tasks, *self._handling]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._supervisor.stop()
        self._tasks.clear()

    async def _main(self) -> None:
        await self._retry("login", self._login)
        await self._retry("first sync", self._first_sync)
        # Our device keys go up before anyone is told we are ready; devices are judged
        # again under the configured trust.
        await self._upkeep(recheck=True)
        await self._restore_messages()
        for room in self.config.rooms:
            self._join_soon(room)
        self.synced.set()
        log.info("matrix: logged in as %s (device %s, session key %s), in %d rooms",
                 self.client.user_id, self.client.device_id, session_key(self.client),
                 len(self.client.rooms))
        self._supervisor.keep("matrix-sync", self._sync_forever)
        self._supervisor.keep("matrix-edits", self.scheduler.run)
        self._supervisor.keep("matrix-progress", self._follow_progress)
        self._supervisor.keep("matrix-undecryptable", self._answer_undecryptable)

    async def _retry(self, what: str, step: Callable[[], Awaitable[bool]]) -> None:
        """Run `step` until it returns True, backing off while the homeserver is away."""
        delay = 1.0
        while True:
            try:
                if await step():
                    return
            except NETWORK_ERRORS as exc:
                log.warning("matrix: %s failed (%s); retrying in %.0fs", what, exc, delay)
            except Exception:  # an odd answer must not end the bot for good
                log.exception("matrix: %s failed; retrying in %.0fs", what, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)

    # -- login ------------------------------------------------------------------------------

    async def _login(self) -> bool:
        try:
            return await self._authenticate() and await self._check_device()
        except PickleKeyError as exc:
            # Raised while nio loads the store, before it could make a new account.
            log.error("matrix: %s (the key from %s). It was left as it is and no new "
                      "device was made: set %s to the key it was made with (see "
                      "docs/encryption.md, The pickle key); retrying", exc, self._key_source,
                      PICKLE_KEY_ENV)
            return False

    async def _authenticate(self) -> bool:
        store, config = self.app.store, self.config
        if not self._open_crypto_store():
            return False
        saved_user, device, saved_token = await self._saved_login()
        token = config.access_token.get_secret_value() if config.access_token else None
        if token is None and saved_user == config.user_id:
            token = saved_token or None
        if token is not None:
            mask([token])
            self.client.access_token = token
            whoami = await self.client.whoami()
            if isinstance(whoami, WhoamiResponse):
                if not await self._own_device(whoami.device_id or device):
                    return False
                # The token's device decides which crypto store to load.
                self.client.restore_login(config.user_id, whoami.device_id or device, token)
                self._started_ms = _server_time_ms(whoami)
                return True
            self.client.access_token = ""
            log.warning("matrix: the access token was refused (%s)", whoami)
            if config.password is None:
                return False
        if config.password is None:
            log.error("matrix: no password or access token for %s; set MATRIXJOBS_PASSWORD",
                      config.user_id)
            return False
        self.client.device_id = device  # reuse our device: no new one per restart
        response = await self.client.login(config.password.get_secret_value(),
                                           device_name=config.device_name)
        if not isinstance(response, LoginResponse):
            log.error("matrix: login as %s failed: %s", config.user_id, response)
            return False
        mask([response.access_token])
        self._started_ms = _server_time_ms(response)
        await self._own_device(response.device_id)
        await store.set_setting(self._setting(SETTING_USER), config.user_id)
        await store.set_setting(self._setting(SETTING_DEVICE), response.device_id)
        await store.set_setting(self._setting(SETTING_TOKEN), response.access_token)
        return True

    async def _saved_login(self) -> tuple[str | None, str, str | None]:
        """The user, device and token this node saved. With a shared store, the login that
        migrate-store copied from a one-node store is this node's if its crypto store has
        that device (and no other node took it first)."""
        keys = (SETTING_USER, SETTING_DEVICE, SETTING_TOKEN)
        store = self.app.store
        user, device, token = [await store.get_setting(self._setting(key)) for key in keys]
        if device is None and self._setting(SETTING_DEVICE) != SETTING_DEVICE:
            copied = [await store.get_setting(key) for key in keys]
            if (copied[1] and (self.store_dir / f"{self.config.user_id}_{copied[1]}.db").exists()
                    and await self._own_device(copied[1])):
                user, device, token = copied
        return user, device or "", token

    async def _own_device(self, device: str) -> bool:
        """With a shared store, is `device` this node's alone? A second node given the same
        access token would be the same device with another crypto store: encrypted rooms
        break for both, so it refuses (and says why) instead."""
        if not self.app.store.shared or not device:
            return True
        key, me = f"{SETTING_DEVICE_OF}{device}", self.app.config.worker.name
        owner = await self.app.store.get_setting(key)
        if owner and owner != me:
            log.error("matrix: device %s is already the bot's device on node %s (the same "
                      "access token?). Each node sharing the store needs its own device: give "
                      "this node the password (it logs in as a new device) or a token of its "
                      "own (see deploy/README.md, Hot standby); retrying", device, owner)
            return False
        if owner is None:
            await self.app.store.set_setting(key, me)
        return True

    def _setting(self, key: str) -> str:
        """The key of a setting of this node's own login. Nodes sharing a store (hot
        standby) must each be a device of their own: one device with two crypto stores
        cannot decrypt. Each keeps its device and token under its worker name."""
        if self.app.store.shared:
            return f"{key}@{self.app.config.worker.name}"
        return key

    def _open_crypto_store(self) -> bool:
        """The crypto store's directory, private, and the key nio pickles it with."""
        # nio keeps one crypto store per device id in here: the device must stay ours.
        try:
            open_store_dir(self.store_dir)
        except OSError as exc:
            log.error("matrix: cannot use the crypto store directory %s (%s): the service "
                      "user must be able to create it and own it; retrying", self.store_dir,
                      exc)
            return False
        try:
            key = load_pickle_key(self.config.pickle_key, self.key_file)
        except CryptoStoreError as exc:
            log.error("matrix: %s; retrying", exc)
            return False
        mask([key.value])
        self.client.config = replace(self.client.config, pickle_key=key.value)
        self._key_source = key.source
        return True

    async def _check_device(self) -> bool:
        """Does the homeserver hand out our crypto store's keys for our device? Without
        that nobody can encrypt for the bot, and every command stays unreadable."""
        olm = self.client.olm
        assert olm is not None
        found = await self.crypto.server_keys()
        if found is None:
            return False
        if found is ServerKeys.NONE and olm.account.shared:
            # nio believes its keys are up and would only send one-time keys.
            log.error("matrix: the homeserver has no keys for our device %s (was it signed "
                      "out?); uploading them again. Messages sent while they were missing "
                      "cannot be decrypted", self.client.device_id)
            olm.account.shared = False
            olm.save_account()
        if found is not ServerKeys.OTHER:
            return True
        return await self._new_device()

    async def _new_device(self) -> bool:
        """Our crypto store lacks the keys the homeserver has for our device (deleted or
        replaced): that device is lost to us; only a new one can decrypt again."""
        old, config = self.client.device_id, self.config
        lost = (f"the crypto store {self.store_dir} does not hold the keys the homeserver "
                f"has for our device {old} (was it deleted or replaced?)")
        if config.access_token is not None or config.password is None:
            log.error("matrix: %s. Restore it from a backup, or let the bot log in as a new "
                      "device: give it its password (MATRIXJOBS_PASSWORD) and no access "
                      "token. Retrying", lost)
            return False
        log.error("matrix: %s; logging in as a new device (messages sent to %s cannot be "
                  "decrypted)", lost, old)
        # Logged in aside: the old device keeps working in plain rooms if this fails.
        aside = AsyncClient(config.homeserver, config.user_id,
                            config=AsyncClientConfig(encryption_enabled=False))
        try:
            response = await aside.login(config.password.get_secret_value(),
                                         device_name=config.device_name)
        finally:
            await aside.close()
        if not isinstance(response, LoginResponse):
            log.error("matrix: login as a new device failed (%s); going on as %s, which "
                      "cannot read encrypted rooms until the next start", response, old)
            self.crypto.keep_server_keys = True
            return True
        mask([response.access_token])
        old_token = self.client.access_token
        self.client.store = None  # nio loads a crypto store only when none is loaded
        self.client.olm = None
        self.client.restore_login(config.user_id, response.device_id, response.access_token)
        store = self.app.store
        await self._own_device(response.device_id)
        await store.set_setting(self._setting(SETTING_DEVICE), response.device_id)
        await store.set_setting(self._setting(SETTING_TOKEN), response.access_token)
        # Signing the old device out deletes it and its keys: nobody encrypts for it again.
        method, path = Api.logout(old_token)[:2]
        signed_out = await self.client.send(method, path, "{}")
        if signed_out.status != 200:
            log.warning("matrix: could not sign the old device %s out (HTTP %s); delete it "
                        "(Element: Sessions, or the admin API)", old, signed_out.status)
        return await self._check_device()

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
                await self.app.store.set_setting(self._setting(SETTING_TOKEN), "")
                await self._retry("login", self._login)
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
                elif isinstance(event, MegolmEvent) and self._is_new(event):
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
        task = asyncio.create_task(self._on_message_safely(room_id, event))
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)

    def _is_new(self, event: RoomMessageText | ReactionEvent | MegolmEvent) -> bool:
        """Not ours, and sent after we started: older messages are never acted on."""
        return (event.sender != self.client.user_id
                and event.server_timestamp >= self._started_ms)

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
            events = await self._fill_gap(room_id, timeline.prev_batch, since) + events
        for index in range(len(events) - 1, -1, -1):
            event = events[index]
            if (isinstance(event, RoomMemberEvent) and event.state_key == self.client.user_id
                    and event.membership == "join"):
                self._known_rooms.add(room_id)
                return events[index + 1:]
        return events if room_id in self._known_rooms else []

    async def _fill_gap(self, room_id: str, start: str, since: str) -> list[Any]:
        """The events a limited sync left out (e.g. after an outage), oldest first."""
        response = await self.client.room_messages(
            room_id, start=start, end=since, direction=MessageDirection.back, limit=GAP_LIMIT)
        if not isinstance(response, RoomMessagesResponse):
            log.warning("matrix: cannot fetch missed messages in %s: %s", room_id, response)
            return []
        return list(reversed(response.chunk))

    def _handle_invites(self, response: SyncResponse) -> None:
        for room_id, info in response.rooms.invite.items():
            inviter = next((e.sender for e in info.invite_state
                            if isinstance(e, InviteMemberEvent)
                            and e.state_key == self.client.user_id
                            and e.membership == "invite"), None)
            if inviter is not None and self.access.allows(inviter):
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

    # -- commands ---------------------------------------------------------------------------

    async def _on_message_safely(self, room_id: str,
                                 event: RoomMessageText | ReactionEvent) -> None:
        try:
            if isinstance(event, ReactionEvent):
                await self._on_reaction(room_id, event)
            else:
                await self._on_message(room_id, event)
        except Exception:
            log.exception("matrix: handling %s in %s failed", event.event_id, room_id)
            # A reaction cannot be shown as a reply's target; the message it is on can.
            answer = event.reacts_to if isinstance(event, ReactionEvent) else event.event_id
            self.scheduler.reply(room_id, answer,
                                 render.render_error("internal error; see the log"))

    async def _on_message(self, room_id: str, event: RoomMessageText) -> None:
        if not self._is_new(event):
            return
        if not await self.crypto.accepts(room_id, event):
            self._untrusted(room_id, event)
            return
        relation = event.source.get("content", {}).get("m.relates_to") or {}
        if relation.get("rel_type") == "m.replace":
            return  # an edited command must not run twice
        try:
            command = parse(event.body, self.config.command_prefix)
        except CommandSyntaxError as exc:
            self._reply(room_id, event, render.render_error(str(exc)))
            return
        if command is None:
            return
        handler = self._commands.get(command.name)
        if handler is None:
            self._reply(room_id, event,
                        render.render_unknown_command(command.name, self.config.command_prefix))
            return
        if command.name in GUARDED and not self.access.allows(event.sender):
            log.info("matrix: denied %s to %s in %s", command.name, event.sender, room_id)
            # One ⛔ per person now and then: a stranger must not drain the send budget.
            if self.access.reply_to_denied and _now_and_then(self._denied_at, event.sender):
                self._reply(room_id, event, render.render_denied())
            return
        try:
            await handler(room_id, event, command)
        except AlreadySubmittedError:
            return  # a replayed event: its job already exists
        except MatrixJobsError as exc:
            self._reply(room_id, event, render.render_error(str(exc)))

    def _reply(self, room_id: str, event: RoomMessageText, rendered: render.Rendered) -> None:
        self.scheduler.reply(room_id, event.event_id, rendered)

    async def _build(self, room_id: str, event: RoomMessageText, command: Command) -> None:
        if not command.args:
            raise MatrixJobsError(f"usage: {self.config.command_prefix}build TARGET [ARGS…]")
        where = _where(room_id, event)
        job = await self.app.submit(command.args[0], command.args[1:],
                                    dedupe_key=event.event_id, show=where,
                                    requester=event.sender)
        await self._show(where, job)

    async def _batch(self, room_id: str, event: RoomMessageText, command: Command) -> None:
        if not command.args:
            raise MatrixJobsError(
                f"usage: {self.config.command_prefix}batch TARGET [TARGET…]")
        where = _where(room_id, event)
        batch = await self.app.submit_batch(list(command.args), dedupe_key=event.event_id,
                                            show=where, requester=event.sender)
        await self._show(where, batch)

    async def _rerun(self, room_id: str, event: RoomMessageText, command: Command) -> None:
        if len(command.args) != 1:
            raise MatrixJobsError(f"usage: {self.config.command_prefix}rerun ID")
        where = _where(room_id, event)
        await self._show(where, await self.app.rerun(command.args[0], event.sender,
                                                     event.event_id, where))

    async def _show(self, where: ProgressMessage, item: Job | Batch) -> None:
        first = event_of(item, time.time())
        self.scheduler.track(where.room_id, where.requester, where.reply_to, first)
        # The job may have moved on while we were submitting it.
        self.scheduler.update(await self.app.status(first.id))

    async def _status(self, room_id: str, event: RoomMessageText, command: Command) -> None:
        now = time.time()
        if command.args:
            self._reply(room_id, event,
                        render.render_progress(await self.app.status(command.args[0]), now))
            return
        self._reply(room_id, event, render.render_status_summary(await self.app.active(), now))

    async def _cancel(self, room_id: str, event: RoomMessageText, command: Command) -> None:
        if len(command.args) != 1:
            raise MatrixJobsError(f"usage: {self.config.command_prefix}cancel ID")
        result = await self.app.cancel(command.args[0])
        self._reply(room_id, event, render.render_cancelled(result.id, str(result.status)))

    async def _logs(self, room_id: str, event: RoomMessageText, command: Command) -> None:
        usage = f"usage: {self.config.command_prefix}logs ID [LINES]"
        if not 1 <= len(command.args) <= 2:
            raise MatrixJobsError(usage)
        lines = render.LOG_LINES
        if len(command.args) == 2:
            if not command.args[1].isdigit() or int(command.args[1]) < 1:
                raise MatrixJobsError(usage)
            lines = min(int(command.args[1]), render.MAX_LOG_LINES)
        job_id = command.args[0]
        text = await self.app.log_tail(job_id, lines, render.MAX_LOG_BYTES)
        self._reply(room_id, event, render.render_log(job_id.strip().lower(), text))

    # -- reactions --------------------------------------------------------------------------

    async def _on_reaction(self, room_id: str, event: ReactionEvent) -> None:
        """❌ or 🔁 from an allowed user on a progress message: cancel or rerun its job or
        batch. Anything else (other keys, people, messages; old or untrusted reactions; ❌
        on finished work) is ignored without a word: a reaction asks for no answer."""
        key = event.key.replace(EMOJI_SELECTOR, "")
        subject = await self._reacted_on(room_id, event, key)
        if subject is None:
            return
        log.info("matrix: %s reacted %s on %s", event.sender, key, subject)
        try:
            if key == CANCEL_KEY:
                await self.app.cancel(subject)  # the message's edit to 🚫 is the answer
                return
            # The new message answers the old progress message: clients show that one as
            # the quote (a reaction cannot be shown as a reply's target).
            where = ProgressMessage("", room_id, None, event.sender, event.reacts_to)
            await self._show(where, await self.app.rerun(subject, event.sender,
                                                         event.event_id, where))
        except (AlreadySubmittedError, AlreadyFinishedError):
            return  # a replayed reaction, or ❌ on work that is over
        except MatrixJobsError as exc:
            self.scheduler.reply(room_id, event.reacts_to, render.render_error(str(exc)))

    async def _reacted_on(self, room_id: str, event: ReactionEvent, key: str) -> str | None:
        """The job or batch whose progress message a reaction to act on is on, else None."""
        if (key not in (CANCEL_KEY, RERUN_KEY) or not self._is_new(event)
                or not self.access.allows(event.sender)):
            return None
        if not await self.crypto.accepts(room_id, event):
            log.warning("matrix: ignoring reaction %s from %s in %s: sent in clear into an "
                        "encrypted room, or from a session not trusted", event.event_id,
                        event.sender, room_id)
            return None
        return await self.app.shown_by(room_id, event.reacts_to)

    async def _jobs(self, room_id: str, event: RoomMessageText, command: Command) -> None:
        items: list[Job | Batch] = [*await self.app.batches(limit=10)]
        items += [job for job in await self.app.jobs(limit=20) if job.batch_id is None]
        items.sort(key=lambda item: item.created_at, reverse=True)
        self._reply(room_id, event,
                    render.render_jobs([self.app.live(item) for item in items[:10]], time.time()))

    async def _targets(self, room_id: str, event: RoomMessageText, command: Command) -> None:
        listed = [(name, target.description, target.args_pattern is not None)
                  for name, target in self.app.targets.items()]
        self._reply(room_id, event, render.render_targets(listed))

    async def _workers(self, room_id: str, event: RoomMessageText, command: Command) -> None:
        now, lease_s = time.time(), self.app.config.queue.lease_s
        states = [worker_state(worker, now, lease_s) for worker in await self.app.workers()]
        self._reply(room_id, event, render.render_workers(states, now))

    async def _help(self, room_id: str, event: RoomMessageText, command: Command) -> None:
        self._reply(room_id, event, render.render_help(self.config.command_prefix))

    async def _answer_undecryptable(self) -> None:
        """Tell an allowed sender (now and then) that their message stayed unreadable."""
        while True:
            for item in await self.crypto.expired():
                self._undecryptable(item)

    def _untrusted(self, room_id: str, event: RoomMessageText) -> None:
        """Log a refused message, and tell an allowed sender (now and then) why their
        command did nothing. An untrusted session cannot read the notice (it gets no room
        keys); their trusted ones can. Chatter gets no notice."""
        cleartext = not event.decrypted
        log.warning("matrix: ignoring %s from %s in %s: %s", event.event_id, event.sender,
                    room_id, "sent unencrypted into an encrypted room" if cleartext else
                    f"its device is not trusted (trust = {self.crypto.trust})")
        if not event.body.startswith(self.config.command_prefix) or not self._notice_due(
                self._untrusted_at, event.sender):
            return
        if cleartext:
            self._reply(room_id, event, render.render_cleartext())
            return
        device = self.crypto.device_of(event)
        self._reply(room_id, event, render.render_untrusted_session(
            device.id if device is not None else None, self.crypto.trust is Trust.VERIFIED))

    def _notice_due(self, last: dict[str, float], sender: str) -> bool:
        """May `sender` get a notice now? Strangers never make the bot talk; allowed users
        get one every DENIED_REPLY_EVERY_S at most."""
        return self.access.allows(sender) and _now_and_then(last, sender)

    def _undecryptable(self, item: Undecryptable) -> None:
        event = item.event
        log.warning("matrix: gave up decrypting %s from %s (device %s) in %s: its room key "
                    "never came", event.event_id, event.sender, event.device_id, item.room_id)
        if not self._notice_due(self._undecryptable_at, event.sender):
            return
        self.scheduler.reply(item.room_id, event.event_id,
                             render.render_undecryptable(str(self.client.device_id)))

    # -- progress ---------------------------------------------------------------------------

    async def _restore_messages(self) -> None:
        """After a restart, keep editing the messages of unfinished work (and finish them)."""
        for message in await self.app.store.open_messages():
            try:
                state = await self.app.status(message.subject_id)
            except MatrixJobsError:
                await self.app.store.update_message(message.subject_id, message.edits, True)
                continue
            self.scheduler.restore(message, state)

    async def _follow_progress(self) -> None:
        assert self._events is not None
        async for event in self._events:
            if self.scheduler.tracks(event.id):
                self.scheduler.update(event)


def _where(room_id: str, command: RoomMessageText) -> ProgressMessage:
    """Where a command's job is shown: a reply to the command. Stored with the job in one
    transaction, so a restart always finds and shows it."""
    return ProgressMessage("", room_id, None, command.sender, command.event_id)


def _now_and_then(last: dict[str, float], sender: str) -> bool:
    """True at most once every DENIED_REPLY_EVERY_S per sender (and notes the time)."""
    now = time.monotonic()
    if now - last.get(sender, -DENIED_REPLY_EVERY_S) < DENIED_REPLY_EVERY_S:
        return False
    last[sender] = now
    return True

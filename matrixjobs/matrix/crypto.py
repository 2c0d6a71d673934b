"""End-to-end encryption for the bot: its crypto store, key upkeep, whom it trusts, and
messages it cannot decrypt (yet).

matrix-nio does the cryptography (vodozemac): it decrypts timeline events during a sync
and encrypts in `room_send`. What a bot with its own sync loop must add is here: upload
and top up one-time keys, learn the devices of the people it shares rooms with and decide
which of them get room keys (`[matrix] trust`), and keep undecryptable messages until
their room key arrives or their time runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from nio import (
    Api,
    AsyncClient,
    EncryptionError,
    Event,
    KeysQueryResponse,
    KeysUploadError,
    LocalProtocolError,
    MegolmEvent,
)
from nio.crypto import OlmDevice, TrustState

from matrixjobs.private import DIR_MODE, make_dirs, tighten

log = logging.getLogger(__name__)

# Undecryptable messages kept at once; more (a flood, or a room that never shares keys
# with the bot) are dropped oldest first.
MAX_PENDING = 200
# Above this many devices in one encrypted room, nio's (synchronous) Olm and Megolm work for
# it holds up the bot for a second or more at a time: say so.
LARGE_ROOM_DEVICES = 100


class Trust(StrEnum):
    TOFU = "tofu"  # pin each device's key when first seen; a changed key is refused
    ALL = "all"  # every device in the room gets room keys
    VERIFIED = "verified"  # only the devices in `[matrix] verified_devices`


class ServerKeys(StrEnum):
    """What the homeserver hands out as our device's keys."""

    OURS = "ours"
    NONE = "none"  # the device was signed out (and created again by our login)
    OTHER = "other"  # not the keys in our crypto store: it was deleted or replaced


def open_store_dir(path: Path) -> None:
    """Create the crypto store directory, readable by the service user only (it holds
    the device's private keys), and tighten the files an older version left in it."""
    make_dirs(path)
    os.chmod(path, DIR_MODE)
    for child in path.iterdir():
        if child.is_file():
            tighten(child)


def session_key(client: AsyncClient) -> str:
    """Our device's Ed25519 key grouped by four, as Element shows a "Session key"."""
    key = client.olm.account.identity_keys["ed25519"] if client.olm is not None else ""
    return " ".join(key[i:i + 4] for i in range(0, len(key), 4))


@dataclass(slots=True)
class Undecryptable:
    room_id: str
    event: MegolmEvent
    deadline: float
    failed: bool = False  # a key came, but not one that decrypts it


class Crypto:
    """Key upkeep and trust for one logged-in client with encryption enabled."""

    def __init__(self, client: AsyncClient, trust: Trust, decrypt_timeout_s: float,
                 pinned: dict[str, dict[str, str]] | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.trust = trust
        self.decrypt_timeout_s = decrypt_timeout_s
        # `[matrix] verified_devices`: user id → device id → Ed25519 key.
        self.pinned = pinned or {}
        self._monotonic = monotonic
        self._pending: dict[str, Undecryptable] = {}
        self._added = asyncio.Event()
        # Devices whose signing key changed under their id (seen in this run's key queries).
        self._changed: set[tuple[str, str]] = set()
        self._upload_failed = False
        self._large_rooms: set[str] = set()
        # Set when our crypto store lost the device's keys and no new device could be had:
        # uploading this store's keys would replace the device's on the homeserver, and the
        # next start could no longer tell that the device was lost.
        self.keep_server_keys = False

    # -- keys -------------------------------------------------------------------------------

    async def upkeep(self) -> None:
        """After each sync: upload (and top up) our keys, learn changed devices, open Olm
        sessions that are missing, and send queued to-device messages (key requests,
        session repairs)."""
        client = self.client
        if client.should_upload_keys and not self.keep_server_keys:
            self._uploaded(await client.keys_upload())
        if client.should_query_keys:
            await self.query_keys()
        if client.should_claim_keys:
            await client.keys_claim(client.get_users_for_key_claiming())
        await client.send_to_device_messages()

    def _uploaded(self, response: object) -> None:
        """Say (once until it works again) that our keys did not go up: until they do,
        nobody can encrypt for the bot."""
        failed = isinstance(response, KeysUploadError)
        if failed and not self._upload_failed:
            log.error("matrix: the homeserver refused our device's keys (%s); nobody can "
                      "encrypt for the bot until they are accepted. If the crypto store "
                      "was deleted or replaced, see docs/encryption.md", response)
        self._upload_failed = failed

    async def server_keys(self) -> ServerKeys | None:
        """Are the keys the homeserver has for our device the ones in our crypto store?
        None: the homeserver did not say."""
        client, olm = self.client, self.client.olm
        assert olm is not None and client.user_id and client.device_id
        method, path, data = Api.keys_query(client.access_token, {client.user_id})
        response = await client.send(method, path, data)
        try:
            body = await response.json(content_type=None) if response.status == 200 else None
        except ValueError:  # not JSON: e.g. a proxy's error page
            body = None
        users = body.get("device_keys") if isinstance(body, dict) else None
        devices = users.get(client.user_id, {}) if isinstance(users, dict) else None
        if not isinstance(devices, dict):
            log.warning("matrix: cannot ask for our device's keys: HTTP %s", response.status)
            return None
        device = devices.get(client.device_id)
        if not device:
            return ServerKeys.NONE
        keys = device.get("keys") if isinstance(device, dict) else None
        if not isinstance(keys, dict):
            return None
        ours = olm.account.identity_keys
        same = all(keys.get(f"{kind}:{client.device_id}") == ours[kind]
                   for kind in ("ed25519", "curve25519"))
        return ServerKeys.OURS if same else ServerKeys.OTHER

    async def query_keys(self) -> None:
        response = await self.client.keys_query()
        if isinstance(response, KeysQueryResponse):
            self._check_pinned(response)
        self.apply_trust()

    def recheck(self) -> None:
        """At start: judge every known device again under the current `trust` and
        `verified_devices` (either may have changed since the last run). A key changed
        under a known device id is found again by the key query that follows the first
        sync: nio tracks users in memory only, so it asks for the keys of every member of
        an encrypted room after each start."""
        self._report_pins()
        self.apply_trust()

    async def prepare_room(self, room_id: str) -> None:
        """Before sending into an encrypted room: know its members and their devices, and
        decide about new ones, so that nio never meets a device we have not judged."""
        client = self.client
        room = client.rooms.get(room_id)
        if room is None or not room.encrypted:
            return
        if not room.members_synced:
            await client.joined_members(room_id)
        if client.should_query_keys:
            await self.query_keys()
        if room_id not in self._large_rooms:
            store = client.device_store
            devices = sum(len(list(store.active_user_devices(user))) for user in room.users
                          if user in store.users)
            if devices > LARGE_ROOM_DEVICES:
                self._large_rooms.add(room_id)
                log.warning("matrix: %s has %d devices: encrypting for them stalls the bot "
                            "for seconds whenever its room key is shared (see "
                            "docs/encryption.md, Cost)", room_id, devices)

    @property
    def ignore_unverified_devices(self) -> bool:
        return self.trust is Trust.ALL

    def apply_trust(self) -> None:
        """Give every device the trust state the policy wants for it now: verified ones get
        room keys and their commands count, blacklisted ones neither. Decisions of earlier
        runs under another policy are undone here too."""
        client, olm = self.client, self.client.olm
        if olm is None:
            return
        for device in list(client.device_store):
            if device.deleted or (device.user_id, device.id) == (client.user_id,
                                                                 client.device_id):
                continue
            wanted = self._wanted(device)
            if wanted is None or device.trust_state is wanted:
                continue
            if wanted is TrustState.verified:
                log.info("matrix: trusting %s's device %s (%s, trust = %s)",
                         device.user_id, device.id, device.ed25519, self.trust)
                client.verify_device(device)
            elif wanted is TrustState.blacklisted:
                log.info("matrix: %s's device %s is not trusted (trust = %s); it gets no "
                         "room keys and its commands are refused",
                         device.user_id, device.id, self.trust)
                client.blacklist_device(device)
            else:
                log.info("matrix: %s's device %s is no longer blocked (trust = all)",
                         device.user_id, device.id)
                client.unblacklist_device(device)

    def _wanted(self, device: OlmDevice) -> TrustState | None:
        """The state the policy wants for `device`; None: leave it as it is."""
        if self.trust is Trust.ALL:
            # nio marks unverified devices "ignored" (and shares with them) when sending.
            return TrustState.unset if device.blacklisted else None
        pin = self.pinned.get(device.user_id, {}).get(device.id)
        if (device.user_id, device.id) in self._changed or pin not in (None, device.ed25519):
            return TrustState.blacklisted
        if pin is not None or self.trust is Trust.TOFU:
            return TrustState.verified  # TOFU: every device not caught changing its key
        return TrustState.blacklisted  # verified-only, and not in verified_devices

    def _report_pins(self) -> None:
        """Say which configured devices cannot be trusted because we know another key."""
        store = self.client.device_store
        for user_id, devices in self.pinned.items():
            for device_id, key in devices.items():
                known = store[user_id].get(device_id) if user_id in store.users else None
                if known is not None and known.ed25519 != key:
                    log.error("matrix: verified_devices lists %s's device %s with key %s, but "
                              "the crypto store knows it with key %s: it is blocked",
                              user_id, device_id, key, known.ed25519)

    def _check_pinned(self, response: KeysQueryResponse) -> None:
        """nio keeps a known device's first signing key and ignores a new one; say so, and
        (unless trust = all) stop sharing room keys with that device id."""
        store = self.client.device_store
        for user_id, devices in response.device_keys.items():
            for device_id, payload in devices.items():
                known = store[user_id].get(device_id) if user_id in store.users else None
                claimed = (payload.get("keys") or {}).get(f"ed25519:{device_id}")
                if known is None or claimed is None or claimed == known.ed25519:
                    continue
                if (user_id, device_id) not in self._changed:
                    self._changed.add((user_id, device_id))
                    log.warning("matrix: the signing key of %s's device %s changed (pinned %s, "
                                "now %s); it gets no room keys and its messages are refused",
                                user_id, device_id, known.ed25519, claimed)

    async def accepts(self, room_id: str, event: Event) -> bool:
        """May a command be acted on, given the device that encrypted it? A cleartext one
        in an encrypted room never: no device vouches for it (anyone holding the user's
        access token can send it), whatever the trust mode. The room's state is judged as
        it is now, so a command sent just before encryption was turned on is refused too."""
        if not getattr(event, "decrypted", False):
            room = self.client.rooms.get(room_id)
            return room is None or not room.encrypted
        if self.trust is Trust.ALL:
            return True
        device = self.device_of(event)
        olm = self.client.olm
        if device is None and olm is not None:
            # A device not met yet (its key query may not have happened): meet it, and
            # judge it.
            olm.users_for_key_query.add(event.sender)
            await self.query_keys()
            device = self.device_of(event)
        # Unknown still (a key swapped under a known device id), or blacklisted: refused.
        return device is not None and device.verified

    def device_of(self, event: Event) -> OlmDevice | None:
        """The known device whose keys encrypted `event`, whatever its trust state."""
        store = self.client.device_store
        curve_key = getattr(event, "sender_key", None)
        if event.sender not in store.users or curve_key is None:
            return None
        return store.device_from_sender_key(event.sender, curve_key)

    # -- undecryptable messages -------------------------------------------------------------

    async def undecryptable(self, room_id: str, event: MegolmEvent) -> None:
        """Remember a message we cannot decrypt, and ask for its room key."""
        event.room_id = event.room_id or room_id
        log.warning("matrix: cannot decrypt %s from %s (device %s) in %s yet; asking for "
                    "its room key", event.event_id, event.sender, event.device_id, room_id)
        if len(self._pending) >= MAX_PENDING:
            self._pending.pop(next(iter(self._pending)))
        self._pending[event.event_id] = Undecryptable(
            room_id, event, self._monotonic() + self.decrypt_timeout_s)
        self._added.set()
        with contextlib.suppress(LocalProtocolError):  # already asked for this session
            await self.client.request_room_key(event)

    def decrypt_pending(self) -> list[tuple[str, Event]]:
        """The remembered messages whose room key has arrived since, decrypted."""
        olm = self.client.olm
        if olm is None:
            return []
        found = []
        for event_id, item in list(self._pending.items()):
            event = item.event
            if not olm.inbound_group_store.get(item.room_id, event.sender_key,
                                               event.session_id):
                continue
            try:
                decrypted = self.client.decrypt_event(event)
            except EncryptionError as exc:
                # Kept until its deadline: the sender is told, as if no key had come.
                if not item.failed:
                    item.failed = True
                    log.warning("matrix: the key for %s arrived but decrypting failed: %s",
                                event_id, exc)
                continue
            del self._pending[event_id]
            log.info("matrix: decrypted %s from %s after its key arrived",
                     event_id, event.sender)
            found.append((item.room_id, decrypted))
        return found

    async def expired(self) -> list[Undecryptable]:
        """Wait until remembered messages run out of time; return (and forget) them."""
        while True:
            now = self._monotonic()
            due = [item for item in self._pending.values() if item.deadline <= now]
            if due:
                for item in due:
                    del self._pending[item.event.event_id]
                return due
            self._added.clear()
            wait = min((item.deadline - now for item in self._pending.values()), default=None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._added.wait(), wait)

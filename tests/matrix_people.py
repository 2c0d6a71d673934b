"""People in a room, for end-to-end tests and benchmarks: send, edit, and read the timeline.

Blocking HTTP (stdlib, through SynapseServer.request); from async code call these via
`asyncio.to_thread`, or the bot running in the same event loop would stall.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nio import (
    Api,
    AsyncClient,
    AsyncClientConfig,
    MegolmEvent,
    RoomCreateResponse,
    RoomMessage,
    RoomPutStateResponse,
    RoomSendResponse,
)
from nio.crypto import OlmDevice

from matrixjobs.demo.synapse import SynapseServer

_txn = itertools.count()


@dataclass
class Person:
    server: SynapseServer
    user_id: str
    token: str

    @classmethod
    def register(cls, server: SynapseServer, name: str) -> Person:
        user = server.register(name, password=f"{name}-password")
        return cls(server, user["user_id"], user["access_token"])

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return self.server.request(method, path, body, token=self.token)

    def create_room(self, invite: list[str], encrypted: bool = False) -> str:
        body: dict[str, Any] = {"preset": "private_chat", "invite": invite}
        return str(self.call("POST", "/_matrix/client/v3/createRoom", body)["room_id"])

    def invite(self, room_id: str, user_id: str) -> None:
        self.call("POST", f"/_matrix/client/v3/rooms/{_quote(room_id)}/invite",
                  {"user_id": user_id})

    def join(self, room_id: str) -> None:
        self.call("POST", f"/_matrix/client/v3/join/{_quote(room_id)}", {})

    def members(self, room_id: str) -> set[str]:
        joined = self.call("GET", f"/_matrix/client/v3/rooms/{_quote(room_id)}/joined_members")
        return set(joined["joined"])

    def send(self, room_id: str, body: str, content: dict[str, Any] | None = None) -> str:
        payload = content or {"msgtype": "m.text", "body": body}
        path = (f"/_matrix/client/v3/rooms/{_quote(room_id)}/send/m.room.message/"
                f"t{next(_txn)}-{self.user_id}")
        return str(self.call("PUT", path, payload)["event_id"])

    def react(self, room_id: str, event_id: str, key: str) -> str:
        """An m.reaction (annotation) on `event_id`, as clients send one."""
        content = {"m.relates_to": {"rel_type": "m.annotation", "event_id": event_id,
                                    "key": key}}
        path = (f"/_matrix/client/v3/rooms/{_quote(room_id)}/send/m.reaction/"
                f"t{next(_txn)}-{self.user_id}")
        return str(self.call("PUT", path, content)["event_id"])

    def redact(self, room_id: str, event_id: str) -> None:
        path = (f"/_matrix/client/v3/rooms/{_quote(room_id)}/redact/{event_id}/"
                f"t{next(_txn)}-{self.user_id}")
        self.call("PUT", path, {})

    def edit(self, room_id: str, original: str, new_body: str) -> str:
        return self.send(room_id, "", {
            "msgtype": "m.text",
            "body": f"* {new_body}",
            "m.new_content": {"msgtype": "m.text", "body": new_body},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original},
        })

    def download(self, mxc: str) -> bytes:
        """A file from the media repository (authenticated media, spec v1.11)."""
        server_name, media_id = mxc.removeprefix("mxc://").split("/", 1)
        request = urllib.request.Request(
            f"{self.server.base_url}/_matrix/client/v1/media/download/{server_name}/{media_id}",
            headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return bytes(response.read())

    def timeline(self, room_id: str, limit: int = 500,
                 event_type: str = "m.room.message") -> list[dict[str, Any]]:
        """The room's message events (as the server has them), oldest first."""
        query = urllib.parse.urlencode({"dir": "b", "limit": limit,
                                        "filter": f'{{"types":["{event_type}"]}}'})
        page = self.call("GET", f"/_matrix/client/v3/rooms/{_quote(room_id)}/messages?{query}")
        return list(reversed(page["chunk"]))


@dataclass
class BotMessage:
    """One progress (or reply) message of the bot and every edit that targets it."""

    original: dict[str, Any]
    edits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def event_id(self) -> str:
        return str(self.original["event_id"])

    @property
    def reply_to(self) -> str | None:
        relation = self.original["content"].get("m.relates_to") or {}
        return (relation.get("m.in_reply_to") or {}).get("event_id")

    @property
    def bodies(self) -> list[str]:
        return [self.original["content"]["body"]] + [
            edit["content"]["m.new_content"]["body"] for edit in self.edits]

    @property
    def current(self) -> str:
        return self.bodies[-1]

    @property
    def current_html(self) -> str:
        latest = self.edits[-1]["content"]["m.new_content"] if self.edits else (
            self.original["content"])
        return str(latest.get("formatted_body", ""))


def bot_messages(events: list[dict[str, Any]], bot: str) -> tuple[list[BotMessage], list[str]]:
    """Group the bot's events into messages with their edits; also return stray edits
    (edits whose target is not an original message of the bot — there must be none)."""
    messages: dict[str, BotMessage] = {}
    strays = []
    for event in events:
        if event["sender"] != bot:
            continue
        relation = event["content"].get("m.relates_to") or {}
        if relation.get("rel_type") == "m.replace":
            target = messages.get(relation.get("event_id", ""))
            if target is None:
                strays.append(event["event_id"])
            else:
                target.edits.append(event)
        else:
            messages[event["event_id"]] = BotMessage(event)
    return list(messages.values()), strays


class EncryptedPerson:
    """Someone with an E2EE-capable client of their own (matrix-nio with the e2e extra),
    syncing in the background; keeps every message it decrypts (and every one it cannot)."""

    def __init__(self, server: SynapseServer, user: dict[str, Any], store_dir: Path) -> None:
        self.user_id = str(user["user_id"])
        self.http = Person(server, self.user_id, user["access_token"])
        store_dir.mkdir(parents=True, exist_ok=True)
        self.client = AsyncClient(server.base_url, self.user_id, store_path=str(store_dir),
                                  config=AsyncClientConfig(encryption_enabled=True))
        self.client.restore_login(self.user_id, user["device_id"], user["access_token"])
        self.decrypted: dict[str, list[dict[str, Any]]] = {}
        self.undecryptable: list[MegolmEvent] = []
        self._sync: asyncio.Task[None] | None = None

    @classmethod
    async def register(cls, server: SynapseServer, name: str, store_dir: Path
                       ) -> EncryptedPerson:
        user = await asyncio.to_thread(server.register, name, f"{name}-password")
        return await cls(server, user, store_dir)._start()

    async def another_session(self, store_dir: Path) -> EncryptedPerson:
        """The same person logging in again: a new device with keys of its own."""
        localpart = self.user_id[1:].split(":")[0]
        user = await asyncio.to_thread(self.http.server.request, "POST",
                                       "/_matrix/client/v3/login", {
                                           "type": "m.login.password",
                                           "identifier": {"type": "m.id.user",
                                                          "user": localpart},
                                           "password": f"{localpart}-password"})
        return await EncryptedPerson(self.http.server, user, store_dir)._start()

    async def impostor(self, store_dir: Path) -> EncryptedPerson:
        """A client on this person's device id and token but with new keys: it uploads
        them, so the homeserver now reports another signing key for the same device."""
        user = {"user_id": self.user_id, "device_id": self.client.device_id,
                "access_token": self.client.access_token}
        return await EncryptedPerson(self.http.server, user, store_dir)._start()

    async def _start(self) -> EncryptedPerson:
        await self.client.keys_upload()
        self.client.add_event_callback(self._on_event, (RoomMessage, MegolmEvent))
        self._sync = asyncio.create_task(self.client.sync_forever(timeout=1000))
        return self

    async def close(self) -> None:
        if self._sync is not None:
            self._sync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync
        await self.client.close()

    async def _on_event(self, room: Any, event: RoomMessage | MegolmEvent) -> None:
        if isinstance(event, MegolmEvent):
            self.undecryptable.append(event)
        else:
            self.decrypted.setdefault(room.room_id, []).append(event.source)

    async def create_encrypted_room(self, invite: list[str]) -> str:
        response = await self.client.room_create(
            invite=invite, initial_state=[{
                "type": "m.room.encryption", "state_key": "",
                "content": {"algorithm": "m.megolm.v1.aes-sha2"}}])
        assert isinstance(response, RoomCreateResponse), response
        return str(response.room_id)

    async def devices_of(self, user_id: str, timeout: float = 30.0) -> list[OlmDevice]:
        """The user's devices, once our client has learnt them (it syncs and queries keys)."""
        deadline = time.monotonic() + timeout
        while True:
            store = self.client.device_store
            devices = list(store.active_user_devices(user_id)) if user_id in store.users else []
            if devices:
                return devices
            assert time.monotonic() < deadline, f"never learnt the devices of {user_id}"
            await asyncio.sleep(0.2)

    async def trust(self, user_id: str) -> None:
        for device in await self.devices_of(user_id):
            self.client.verify_device(device)

    async def blacklist(self, user_id: str) -> None:
        for device in await self.devices_of(user_id):
            self.client.blacklist_device(device)

    async def create_plain_room(self, invite: list[str]) -> str:
        response = await self.client.room_create(invite=invite)
        assert isinstance(response, RoomCreateResponse), response
        return str(response.room_id)

    async def encrypt_room(self, room_id: str, timeout: float = 30.0) -> None:
        """Turn encryption on in a room, and wait until our client knows."""
        response = await self.client.room_put_state(
            room_id, "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"})
        assert isinstance(response, RoomPutStateResponse), response
        deadline = time.monotonic() + timeout
        while not getattr(self.client.rooms.get(room_id), "encrypted", False):
            assert time.monotonic() < deadline, "the encryption state never came back"
            await asyncio.sleep(0.1)

    async def send(self, room_id: str, body: str, ignore_unverified_devices: bool = False
                   ) -> str:
        """Send encrypted, sharing the room key only with devices we trust (or, with
        ignore_unverified_devices, with every device not blacklisted)."""
        response = await self.client.room_send(
            room_id, "m.room.message", {"msgtype": "m.text", "body": body},
            ignore_unverified_devices=ignore_unverified_devices)
        assert isinstance(response, RoomSendResponse), response
        return str(response.event_id)

    async def react(self, room_id: str, event_id: str, key: str) -> str:
        """An encrypted m.reaction, as Element sends one into an encrypted room (nio's own
        room_send would send a reaction in clear); the relation stays in clear."""
        olm = self.client.olm
        assert olm is not None
        if olm.should_share_group_session(room_id):
            await self.client.share_group_session(room_id, ignore_unverified_devices=True)
        kind, content = self.client.encrypt(room_id, "m.reaction", {"m.relates_to": {
            "rel_type": "m.annotation", "event_id": event_id, "key": key}})
        method, path, data = Api.room_send(self.client.access_token, room_id, kind, content,
                                           f"r{next(_txn)}")
        response = await self.client._send(RoomSendResponse, method, path, data, (room_id,))
        assert isinstance(response, RoomSendResponse), response
        return str(response.event_id)

    def messages_of(self, room_id: str, sender: str) -> list[BotMessage]:
        """`sender`'s messages as decrypted here, each with its edits."""
        messages, strays = bot_messages(self.decrypted.get(room_id, []), sender)
        assert strays == [], "every edit must target an original message of the sender"
        return messages


def _quote(room_id: str) -> str:
    return urllib.parse.quote(room_id, safe="")

"""The bot in end-to-end encrypted rooms, against a real Synapse, with a person whose own
client (matrix-nio with the e2e extra) encrypts commands and decrypts the bot's messages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import ClientConnectionError
from helpers import MATRIX_TARGETS, final_state, make_config, state_dir
from matrix_people import BotMessage, EncryptedPerson
from nio import MegolmEvent, ToDeviceMessage, ToDeviceResponse
from nio.crypto.attachments import decrypt_attachment
from nio.store import DefaultStore
from pydantic import SecretStr

from matrixjobs.app import App
from matrixjobs.matrix import crypto
from matrixjobs.matrix import session as session_module
from matrixjobs.matrix.crypto_store import DEFAULT_PICKLE_KEY, PickleKey
from matrixjobs.service import build_service

pytestmark = pytest.mark.timeout(120)

_names = iter(range(10_000))


def finished(body: str) -> bool:
    return body.startswith(("✅", "❌", "🚫"))


async def start_bot(config: Any) -> App:
    app = build_service(config)
    await app.start()
    await asyncio.wait_for(app.components[0].synced.wait(), 30)
    return app


class EncryptedScene:
    """A bot and an allowed person with an E2EE client, in an encrypted room."""

    def __init__(self, server: Any, tmp_path: Any) -> None:
        self.server = server
        self.tmp_path = tmp_path
        self.n = next(_names)
        self.bot_id = ""
        self.room = ""
        self.alice: EncryptedPerson | None = None
        self.sessions: list[EncryptedPerson] = []

    async def setup(self) -> None:
        bot = await asyncio.to_thread(self.server.register, f"ebot{self.n}", "bot-password")
        self.bot_id = bot["user_id"]
        self.alice = await EncryptedPerson.register(
            self.server, f"ealice{self.n}", self.tmp_path / "alice-crypto")

    def config(self, **matrix: Any) -> Any:
        assert self.alice is not None
        return make_config(
            self.tmp_path,
            matrix={"homeserver": self.server.base_url, "user_id": self.bot_id,
                    "password": "bot-password", "rate_per_s": 0, **matrix},
            access={"allowed_users": [self.alice.user_id]},
            progress={"interval_ms": 200},
            targets=MATRIX_TARGETS,
        )

    async def open_room(self, encrypted: bool = True) -> str:
        assert self.alice is not None
        create = self.alice.create_encrypted_room if encrypted else self.alice.create_plain_room
        self.room = await create([self.bot_id])
        deadline = time.monotonic() + 30
        while self.bot_id not in await asyncio.to_thread(self.alice.http.members, self.room):
            assert time.monotonic() < deadline, "the bot never joined"
            await asyncio.sleep(0.2)
        return self.room

    async def another_session(self, impostor: bool = False) -> EncryptedPerson:
        """Alice logging in again (a new device), or an impostor that uploads new keys for
        her device id; either is in the room and trusts the bot's device."""
        assert self.alice is not None
        store_dir = self.tmp_path / f"alice-crypto-{len(self.sessions) + 1}"
        session = await (self.alice.impostor(store_dir) if impostor
                         else self.alice.another_session(store_dir))
        self.sessions.append(session)
        deadline = time.monotonic() + 30
        while self.room not in session.client.rooms:
            assert time.monotonic() < deadline, "the new session never saw the room"
            await asyncio.sleep(0.1)
        await session.trust(self.bot_id)
        return session

    async def stranger(self) -> EncryptedPerson:
        """Someone not in allowed_users, with an E2EE client, who joined the room."""
        assert self.alice is not None
        stranger = await EncryptedPerson.register(
            self.server, f"estranger{self.n}", self.tmp_path / "stranger-crypto")
        self.sessions.append(stranger)
        await asyncio.to_thread(self.alice.http.invite, self.room, stranger.user_id)
        await asyncio.to_thread(stranger.http.join, self.room)
        deadline = time.monotonic() + 30
        while self.room not in stranger.client.rooms:
            assert time.monotonic() < deadline, "the stranger never saw the room"
            await asyncio.sleep(0.1)
        return stranger

    async def reply_to(self, command: str, final: Callable[[str], bool] = lambda b: True,
                       timeout: float = 30.0, reader: EncryptedPerson | None = None
                       ) -> BotMessage:
        """The bot's reply to `command` as `reader` (default: alice) decrypts it."""
        reader = reader or self.alice
        assert reader is not None
        deadline = time.monotonic() + timeout
        while True:
            for message in reader.messages_of(self.room, self.bot_id):
                if message.reply_to == command and final(message.current):
                    return message
            assert time.monotonic() < deadline, f"no (final) reply to {command}"
            await asyncio.sleep(0.2)


@pytest.fixture
async def encrypted(synapse, tmp_path):
    scene = EncryptedScene(synapse, tmp_path)
    await scene.setup()
    yield scene
    assert scene.alice is not None
    for session in [scene.alice, *scene.sessions]:
        await session.close()


def assert_encrypted_edits(scene: EncryptedScene, message: BotMessage) -> None:
    """On the server the bot's messages are ciphertext; an edit's relation stays readable."""
    assert scene.alice is not None
    plain = scene.alice.http.timeline(scene.room)
    assert [e for e in plain if e["sender"] == scene.bot_id] == [], "nothing sent in clear"
    raw = {e["event_id"]: e for e in scene.alice.http.timeline(scene.room,
                                                               event_type="m.room.encrypted")}
    assert raw[message.event_id]["content"]["algorithm"] == "m.megolm.v1.aes-sha2"
    for edit in message.edits:
        wrapper = raw[edit["event_id"]]["content"]
        assert wrapper["m.relates_to"] == {"rel_type": "m.replace",
                                           "event_id": message.event_id}
        assert "m.new_content" not in wrapper and "body" not in wrapper
        assert edit["content"]["m.new_content"]["body"] == edit["content"]["body"][2:]


async def assert_encrypted_log_file(scene: EncryptedScene, message: BotMessage,
                                    log_text: str) -> None:
    """The failed job's log came as an encrypted m.file in a thread under its message,
    and decrypts to the log."""
    assert scene.alice is not None
    deadline = time.monotonic() + 30
    while not (files := [m.original["content"] for m in
                         scene.alice.messages_of(scene.room, scene.bot_id)
                         if m.original["content"].get("msgtype") == "m.file"]):
        assert time.monotonic() < deadline, "no log file"
        await asyncio.sleep(0.2)
    [content] = files
    assert content["m.relates_to"]["rel_type"] == "m.thread"
    assert content["m.relates_to"]["event_id"] == message.event_id
    assert "url" not in content, "an encrypted room gets an encrypted file"
    file = content["file"]
    ciphertext = await asyncio.to_thread(scene.alice.http.download, file["url"])
    assert ciphertext != log_text.encode()
    plain = decrypt_attachment(ciphertext, file["key"]["k"], file["hashes"]["sha256"],
                               file["iv"])
    assert plain == log_text.encode() and b"compiler exploded" in plain


async def test_build_and_batch_in_an_encrypted_room_and_again_after_a_restart(encrypted):
    scene = encrypted
    app = await start_bot(scene.config())
    bot = app.components[0]
    device, identity = bot.client.device_id, bot.client.olm.account.identity_keys
    try:
        await scene.open_room()
        assert scene.alice is not None
        await scene.alice.trust(scene.bot_id)

        command = await scene.alice.send(scene.room, "!build slow 4")
        message = await scene.reply_to(command, finished)
        assert message.current.startswith("✅") and "slow 4" in message.current
        assert "🟩" * 10 in message.current
        assert len(message.edits) >= 2, "progress should have been shown while it ran"
        assert any("/4" in body for body in message.bodies[:-1])
        await asyncio.to_thread(assert_encrypted_edits, scene, message)

        command = await scene.alice.send(scene.room, "!batch quick slow quick")
        message = await scene.reply_to(command, finished)
        assert message.current.startswith("✅") and "3/3" in message.current

        command = await scene.alice.send(scene.room, "!build broken")
        message = await scene.reply_to(command, finished)
        assert message.current.startswith("❌")
        await assert_encrypted_log_file(scene, message, await app.log("j5"))
    finally:
        await app.stop()

    store_dir = state_dir(scene.tmp_path) / "matrixjobs-crypto"
    assert stat.S_IMODE(store_dir.stat().st_mode) == 0o700

    app = await start_bot(scene.config())
    try:
        bot = app.components[0]
        assert bot.client.device_id == device, "a new device per restart breaks decryption"
        assert bot.client.olm.account.identity_keys == identity
        command = await scene.alice.send(scene.room, "!build slow 2")
        message = await scene.reply_to(command, finished)
        assert message.current.startswith("✅") and "slow 2" in message.current
        await asyncio.to_thread(assert_encrypted_edits, scene, message)
        builds = [job for job in await app.jobs() if job.batch_id is None]
        assert len(builds) == 3 and len(await app.batches()) == 1, "nothing ran twice"
    finally:
        await app.stop()


async def test_a_command_whose_key_never_comes_gets_a_notice_and_starts_nothing(encrypted):
    scene = encrypted
    app = await start_bot(scene.config(decrypt_timeout_s=2))
    try:
        await scene.open_room()
        assert scene.alice is not None
        # Alice's client keeps its room key from the bot's device: the bot never gets it.
        await scene.alice.blacklist(scene.bot_id)
        command = await scene.alice.send(scene.room, "!build quick")
        notice = await scene.reply_to(command, timeout=40)
        assert notice.current.startswith("🔒") and "could not decrypt" in notice.current
        assert notice.original["content"]["msgtype"] == "m.notice"
        assert str(app.components[0].client.device_id) in notice.current
        assert await app.jobs() == [] and await app.batches() == []
    finally:
        await app.stop()


async def send_room_key(scene: EncryptedScene, room_key: dict[str, str]) -> None:
    """Alice's client sends `room_key` to the bot's device (Olm-encrypted, to-device)."""
    alice = scene.alice
    assert alice is not None
    (device,) = await alice.devices_of(scene.bot_id)
    if alice.client.olm.session_store.get(device.curve25519) is None:
        await alice.client.keys_claim({scene.bot_id: [device.id]})
    olm_session = alice.client.olm.session_store.get(device.curve25519)
    content = alice.client.olm._olm_encrypt(olm_session, device, "m.room_key", room_key)
    sent = await alice.client.to_device(
        ToDeviceMessage("m.room.encrypted", scene.bot_id, device.id, content))
    assert isinstance(sent, ToDeviceResponse), sent


async def test_a_command_is_run_once_when_its_key_arrives_late(encrypted, caplog):
    scene = encrypted
    caplog.set_level(logging.INFO, logger="matrixjobs.matrix")
    app = await start_bot(scene.config(decrypt_timeout_s=60))
    try:
        await scene.open_room()
        alice = scene.alice
        assert alice is not None
        # Alice's client shares the room key with nobody, and keeps a copy for later.
        await alice.blacklist(scene.bot_id)
        await alice.client.share_group_session(scene.room)
        session = alice.client.olm.outbound_group_sessions[scene.room]
        room_key = {"algorithm": "m.megolm.v1.aes-sha2", "room_id": scene.room,
                    "session_id": session.id, "session_key": session.session_key}
        command = await alice.send(scene.room, "!build quick")
        deadline = time.monotonic() + 30
        while f"cannot decrypt {command}" not in caplog.text:
            assert time.monotonic() < deadline, "the bot never noticed the message"
            await asyncio.sleep(0.2)

        # Now the key arrives, as a delayed to-device message would bring it.
        await send_room_key(scene, room_key)

        message = await scene.reply_to(command, finished)
        assert message.current.startswith("✅") and "quick" in message.current
        assert f"decrypted {command}" in caplog.text
        assert len(await app.jobs()) == 1
    finally:
        await app.stop()


# -- whom the bot trusts ---------------------------------------------------------------------


def pin(person: EncryptedPerson) -> str:
    """A `verified_devices` entry as a person copies it from Element: the session id, a
    colon, and the session key in groups of four."""
    key = person.client.olm.account.identity_keys["ed25519"]
    grouped = " ".join(key[i:i + 4] for i in range(0, len(key), 4))
    return f"{person.client.device_id}:{grouped}"


async def logged(caplog: Any, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in caplog.text:
        assert time.monotonic() < deadline, f"never logged: {text}"
        await asyncio.sleep(0.1)


def encrypted_replies(scene: EncryptedScene, command: str) -> list[str]:
    """The bot's replies to `command` as the server has them: ciphertext whose reply
    relation stays in the clear."""
    assert scene.alice is not None
    return [e["event_id"] for e in scene.alice.http.timeline(scene.room,
                                                             event_type="m.room.encrypted")
            if e["sender"] == scene.bot_id
            and (e["content"].get("m.relates_to") or {}).get("m.in_reply_to", {}).get(
                "event_id") == command]


async def test_tofu_trusts_a_new_session_of_a_known_user(encrypted):
    scene = encrypted
    app = await start_bot(scene.config())
    try:
        await scene.open_room()
        assert scene.alice is not None
        await scene.alice.trust(scene.bot_id)
        first = await scene.alice.send(scene.room, "!build quick")
        await scene.reply_to(first, finished)

        second = await scene.another_session()
        command = await second.send(scene.room, "!build quick", ignore_unverified_devices=True)
        # The new session decrypts the reply: the bot trusted it and shared its room key.
        message = await scene.reply_to(command, finished, reader=second)
        assert message.current.startswith("✅")
        assert len(await app.jobs()) == 2
    finally:
        await app.stop()


async def test_tofu_refuses_a_session_whose_keys_changed_also_after_a_restart(encrypted,
                                                                              caplog):
    scene = encrypted
    caplog.set_level(logging.INFO, logger="matrixjobs.matrix")
    app = await start_bot(scene.config())
    alice = scene.alice
    assert alice is not None
    device = alice.client.device_id
    try:
        await scene.open_room()
        await alice.trust(scene.bot_id)
        first = await alice.send(scene.room, "!build quick")
        await scene.reply_to(first, finished)  # the bot has pinned alice's device keys
        await alice.close()

        # The homeserver now reports other keys for alice's device id (as a malicious
        # server, or a stolen token, could).
        impostor = await scene.another_session(impostor=True)
        await logged(caplog, f"the signing key of {alice.user_id}'s device {device} changed")
        command = await impostor.send(scene.room, "!build quick")
        await logged(caplog, f"ignoring {command} from {alice.user_id}")
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(encrypted_replies, scene, command):
            assert time.monotonic() < deadline, "no notice"
            await asyncio.sleep(0.2)
        assert len(await app.jobs()) == 1
    finally:
        await app.stop()

    # A new start asks for the keys again, finds the change again and keeps refusing.
    app = await start_bot(scene.config())
    try:
        bot = app.components[0]
        assert bot.client.device_store[alice.user_id][device].blacklisted
        command = await impostor.send(scene.room, "!build quick")
        await logged(caplog, f"ignoring {command} from {alice.user_id}")
        assert len(await app.jobs()) == 1
        assert not any(m.reply_to in (first, command)
                       for m in impostor.messages_of(scene.room, scene.bot_id))
    finally:
        await app.stop()


async def test_verified_acts_only_for_listed_sessions_and_a_restart_applies_a_new_policy(
        encrypted, caplog):
    scene = encrypted
    caplog.set_level(logging.INFO, logger="matrixjobs.matrix")
    alice = scene.alice
    assert alice is not None
    verified = scene.config(trust="verified", verified_devices={alice.user_id: [pin(alice)]})
    app = await start_bot(verified)
    try:
        await scene.open_room()
        await alice.trust(scene.bot_id)
        second = await scene.another_session()
        command = await alice.send(scene.room, "!build quick", ignore_unverified_devices=True)
        message = await scene.reply_to(command, finished)
        assert message.current.startswith("✅")

        refused = await second.send(scene.room, "!build quick", ignore_unverified_devices=True)
        # The notice is readable by alice's listed session, not by the refused one.
        notice = await scene.reply_to(refused)
        assert notice.current.startswith("🔒") and second.client.device_id in notice.current
        assert "verified devices" in notice.current
        assert notice.original["content"]["msgtype"] == "m.notice"
        deadline = time.monotonic() + 30
        while notice.event_id not in {e.event_id for e in second.undecryptable}:
            assert time.monotonic() < deadline, "the refused session got the notice's key"
            await asyncio.sleep(0.1)
        assert len(await app.jobs()) == 1
    finally:
        await app.stop()

    # Back to trust on first use: the session blocked so far is trusted now.
    app = await start_bot(scene.config(trust="tofu"))
    try:
        command = await second.send(scene.room, "!build quick", ignore_unverified_devices=True)
        message = await scene.reply_to(command, finished, reader=second)
        assert message.current.startswith("✅")
        assert len(await app.jobs()) == 2
    finally:
        await app.stop()

    # And verified-only again: trusted on first use before, blocked now.
    app = await start_bot(verified)
    try:
        bot = app.components[0]
        assert bot.client.device_store[alice.user_id][second.client.device_id].blacklisted
        assert bot.client.device_store[alice.user_id][alice.client.device_id].verified
        command = await second.send(scene.room, "!build quick", ignore_unverified_devices=True)
        await logged(caplog, f"ignoring {command} from {alice.user_id}")
        assert len(await app.jobs()) == 2
    finally:
        await app.stop()


async def test_all_acts_for_every_session_and_shares_keys_with_each(encrypted):
    scene = encrypted
    app = await start_bot(scene.config(trust="all"))
    try:
        await scene.open_room()
        assert scene.alice is not None
        await scene.alice.trust(scene.bot_id)
        second = await scene.another_session()
        for person in (scene.alice, second):
            command = await person.send(scene.room, "!build quick",
                                        ignore_unverified_devices=True)
            message = await scene.reply_to(command, finished, reader=person)
            assert message.current.startswith("✅")
        assert len(await app.jobs()) == 2
    finally:
        await app.stop()


async def test_a_room_encrypted_after_the_bot_joined(encrypted):
    scene = encrypted
    app = await start_bot(scene.config())
    try:
        await scene.open_room(encrypted=False)
        alice = scene.alice
        assert alice is not None
        command = await alice.send(scene.room, "!build quick")
        plain = await scene.reply_to(command, finished)

        await alice.encrypt_room(scene.room)
        await alice.trust(scene.bot_id)
        command = await alice.send(scene.room, "!build slow 2")
        message = await scene.reply_to(command, finished)
        assert message.current.startswith("✅") and "slow 2" in message.current
        raw = {e["event_id"] for e in await asyncio.to_thread(
            alice.http.timeline, scene.room, event_type="m.room.encrypted")}
        assert plain.event_id not in raw
        assert {message.event_id, *(edit["event_id"] for edit in message.edits)} <= raw
        assert len(await app.jobs()) == 2
    finally:
        await app.stop()


async def test_an_encrypted_reaction_reruns_and_a_cleartext_one_is_ignored(encrypted, caplog):
    scene = encrypted
    caplog.set_level(logging.INFO, logger="matrixjobs.matrix")
    app = await start_bot(scene.config())
    try:
        await scene.open_room()
        alice = scene.alice
        assert alice is not None
        await alice.trust(scene.bot_id)
        command = await alice.send(scene.room, "!build quick")
        first = await scene.reply_to(command, finished)
        # Sent in clear into an encrypted room (as nio itself sends reactions): no device
        # vouches for it, so it is ignored like a cleartext command.
        clear = await asyncio.to_thread(alice.http.react, scene.room, first.event_id, "🔁")
        await logged(caplog, f"ignoring reaction {clear} from {alice.user_id}")
        assert len(await app.jobs()) == 1
        reaction = await alice.react(scene.room, first.event_id, "🔁")
        assert "m.relates_to" in {e["event_id"]: e for e in await asyncio.to_thread(
            alice.http.timeline, scene.room, 50, "m.room.encrypted")}[reaction]["content"]
        second = await scene.reply_to(first.event_id, finished)
        assert second.current.startswith("✅ quick (j2)")
        assert len(await app.jobs()) == 2
    finally:
        await app.stop()


# -- what the bot refuses, and whom it answers -----------------------------------------------


async def test_a_cleartext_command_in_an_encrypted_room_is_refused_even_from_a_listed_user(
        encrypted, caplog):
    scene = encrypted
    caplog.set_level(logging.INFO, logger="matrixjobs.matrix")
    alice = scene.alice
    assert alice is not None
    # Alice's only device is verified by configuration; a script holding her access token
    # has no device at all.
    app = await start_bot(scene.config(trust="verified",
                                       verified_devices={alice.user_id: [pin(alice)]}))
    try:
        await scene.open_room()
        await alice.trust(scene.bot_id)
        command = await asyncio.to_thread(alice.http.send, scene.room, "!build quick")
        await logged(caplog, f"ignoring {command} from {alice.user_id} in {scene.room}: sent "
                             "unencrypted into an encrypted room")
        notice = await scene.reply_to(command)
        assert notice.current.startswith("🔒") and "not encrypted" in notice.current
        assert await app.jobs() == []

        # The same command encrypted by her listed device runs.
        command = await alice.send(scene.room, "!build quick")
        assert (await scene.reply_to(command, finished)).current.startswith("✅")
        assert len(await app.jobs()) == 1
    finally:
        await app.stop()


async def test_a_stranger_never_makes_the_bot_talk_in_an_encrypted_room(encrypted, caplog):
    scene = encrypted
    caplog.set_level(logging.INFO, logger="matrixjobs.matrix")
    app = await start_bot(scene.config(decrypt_timeout_s=1))
    try:
        await scene.open_room()
        alice = scene.alice
        assert alice is not None
        await alice.trust(scene.bot_id)
        stranger = await scene.stranger()
        cleartext = await asyncio.to_thread(stranger.http.send, scene.room, "!build quick")
        await logged(caplog, f"ignoring {cleartext} from {stranger.user_id}")
        # Its client keeps the room key from the bot: the bot gives up on it, silently.
        await stranger.blacklist(scene.bot_id)
        unreadable = await stranger.send(scene.room, "!build quick",
                                         ignore_unverified_devices=True)
        await logged(caplog, f"gave up decrypting {unreadable}")

        # Replies go out in order: once alice has hers, none to the stranger is queued.
        command = await alice.send(scene.room, "!build quick", ignore_unverified_devices=True)
        await scene.reply_to(command, finished)
        for refused in (cleartext, unreadable):
            assert await asyncio.to_thread(encrypted_replies, scene, refused) == []
        assert len(await app.jobs()) == 1
    finally:
        await app.stop()


# -- the bot's own device --------------------------------------------------------------------


def published_keys(scene: EncryptedScene, device: str) -> dict[str, str]:
    """The keys the homeserver hands out for the bot's `device` ({} if none)."""
    assert scene.alice is not None
    found = scene.alice.http.call("POST", "/_matrix/client/v3/keys/query",
                                  {"device_keys": {scene.bot_id: []}})
    return dict((found["device_keys"].get(scene.bot_id, {}).get(device) or {}).get("keys", {}))


async def test_a_signed_out_device_gets_its_keys_back_at_the_next_login(encrypted, caplog):
    scene = encrypted
    caplog.set_level(logging.INFO, logger="matrixjobs.matrix")
    app = await start_bot(scene.config())
    bot = app.components[0]
    device, identity = bot.client.device_id, bot.client.olm.account.identity_keys
    try:
        await scene.open_room()
    finally:
        await app.stop()
    # Signed out (Element's session list, or the admin API): its keys go with it.
    await asyncio.to_thread(
        scene.server.request, "DELETE",
        f"/_synapse/admin/v2/users/{scene.bot_id}/devices/{device}", None,
        scene.server.admin["access_token"])
    assert await asyncio.to_thread(published_keys, scene, device) == {}

    app = await start_bot(scene.config())  # the token is dead: a password login, same id
    try:
        assert app.components[0].client.device_id == device
        keys = await asyncio.to_thread(published_keys, scene, device)
        assert keys.get(f"ed25519:{device}") == identity["ed25519"], "nobody can encrypt"
        assert f"the homeserver has no keys for our device {device}" in caplog.text
        # A session of alice's that never saw the device go encrypts for it again.
        second = await scene.another_session()
        command = await second.send(scene.room, "!build quick", ignore_unverified_devices=True)
        message = await scene.reply_to(command, finished, reader=second)
        assert message.current.startswith("✅")
    finally:
        await app.stop()


async def test_a_lost_crypto_store_needs_the_password_to_start_over_as_a_new_device(
        encrypted, caplog):
    scene = encrypted
    caplog.set_level(logging.INFO, logger="matrixjobs.matrix")
    alice = scene.alice
    assert alice is not None
    app = await start_bot(scene.config())
    old = app.components[0].client.device_id
    try:
        await scene.open_room()
    finally:
        await app.stop()
    shutil.rmtree(state_dir(scene.tmp_path) / "matrixjobs-crypto")

    # The saved token still works, but no crypto store holds its device's keys.
    app = build_service(scene.config(password=None))
    await app.start()
    try:
        await logged(caplog, f"does not hold the keys the homeserver has for our device {old}")
        assert "Restore it from a backup" in caplog.text
        assert not app.components[0].synced.is_set()
    finally:
        await app.stop()

    # A wrong password: the old device goes on (plain rooms keep working), its token kept.
    app = await start_bot(scene.config(password="not-the-password"))
    try:
        assert "login as a new device failed" in caplog.text
        assert app.components[0].client.device_id == old
        assert await app.store.get_setting("matrix.device_id") == old
    finally:
        await app.stop()

    app = await start_bot(scene.config())
    try:
        bot = app.components[0]
        new = bot.client.device_id
        assert new != old and "logging in as a new device" in caplog.text
        keys = await asyncio.to_thread(published_keys, scene, new)
        assert keys[f"ed25519:{new}"] == bot.client.olm.account.identity_keys["ed25519"]
        # The old device was signed out: nobody encrypts for it any more.
        assert await asyncio.to_thread(published_keys, scene, old) == {}
        deadline = time.monotonic() + 30
        while new not in {d.id for d in await alice.devices_of(scene.bot_id)}:
            assert time.monotonic() < deadline, "alice never learnt the bot's new device"
            await asyncio.sleep(0.1)
        await alice.trust(scene.bot_id)
        command = await alice.send(scene.room, "!build quick", ignore_unverified_devices=True)
        message = await scene.reply_to(command, finished)
        assert message.current.startswith("✅")
    finally:
        await app.stop()


async def test_a_message_in_a_room_left_while_down_is_given_up_not_retried(encrypted, caplog):
    scene = encrypted
    caplog.set_level(logging.INFO)
    alice = scene.alice
    assert alice is not None
    app = await start_bot(scene.config())
    try:
        left = await scene.open_room(encrypted=False)
        command = await asyncio.to_thread(alice.http.send, left, "!build slow 30")
        deadline = time.monotonic() + 30
        while not [m for m in alice.messages_of(left, scene.bot_id) if m.reply_to == command]:
            assert time.monotonic() < deadline, "no progress message"
            await asyncio.sleep(0.1)
    finally:
        await app.stop()  # the job goes back to the queue; its message stays open
    await asyncio.to_thread(alice.http.call, "POST",
                            f"/_matrix/client/v3/rooms/{quote(left, safe='')}/kick",
                            {"user_id": scene.bot_id})

    app = await start_bot(scene.config())
    try:
        await logged(caplog, f"giving up a message in {left}")
        # Nothing else waits behind it.
        await scene.open_room()
        await alice.trust(scene.bot_id)
        command = await alice.send(scene.room, "!build quick")
        await scene.reply_to(command, finished, timeout=15)
        assert f"sending to {left} failed" not in caplog.text
    finally:
        await app.stop()


# -- undecryptable messages: the rough edges -------------------------------------------------


async def test_a_key_that_does_not_decrypt_keeps_the_message_until_its_notice(encrypted,
                                                                              caplog):
    scene = encrypted
    caplog.set_level(logging.INFO, logger="matrixjobs.matrix")
    app = await start_bot(scene.config(decrypt_timeout_s=4))
    try:
        await scene.open_room()
        alice = scene.alice
        assert alice is not None
        await alice.blacklist(scene.bot_id)
        command = await alice.send(scene.room, "!build quick")
        await logged(caplog, f"cannot decrypt {command}")
        # The room key as it is after the command: it decrypts later messages only.
        session = alice.client.olm.outbound_group_sessions[scene.room]
        await send_room_key(scene, {"algorithm": "m.megolm.v1.aes-sha2", "room_id": scene.room,
                                    "session_id": session.id,
                                    "session_key": session.session_key})
        await logged(caplog, f"the key for {command} arrived but decrypting failed")
        notice = await scene.reply_to(command, timeout=30)
        assert "could not decrypt" in notice.current
        assert await app.jobs() == []
    finally:
        await app.stop()


async def test_a_failed_room_key_request_does_not_lose_the_sync(encrypted, caplog,
                                                                monkeypatch):
    scene = encrypted
    caplog.set_level(logging.INFO)
    app = await start_bot(scene.config(decrypt_timeout_s=1))
    bot = app.components[0]

    async def unreachable(event: Any, tx_id: Any = None) -> None:
        raise ClientConnectionError("the homeserver went away")

    # A fault at exactly that point cannot be caused from outside: inject it.
    monkeypatch.setattr(bot.client, "request_room_key", unreachable)
    try:
        await scene.open_room()
        alice = scene.alice
        assert alice is not None
        await alice.blacklist(scene.bot_id)
        command = await alice.send(scene.room, "!build quick")
        await logged(caplog, f"asking for the room key of {command} failed")
        notice = await scene.reply_to(command, timeout=30)
        assert "could not decrypt" in notice.current
        assert "matrix-sync crashed" not in caplog.text
    finally:
        await app.stop()


async def test_a_room_with_many_devices_is_warned_about(encrypted, caplog, monkeypatch):
    scene = encrypted
    caplog.set_level(logging.INFO, logger="matrixjobs.matrix")
    monkeypatch.setattr(crypto, "LARGE_ROOM_DEVICES", 0)  # alice's one device is "many"
    app = await start_bot(scene.config())
    try:
        await scene.open_room()
        alice = scene.alice
        assert alice is not None
        await alice.trust(scene.bot_id)
        command = await alice.send(scene.room, "!build quick")
        await scene.reply_to(command, finished)
        assert f"{scene.room} has 1 devices: encrypting for them stalls the bot" in caplog.text
        assert caplog.text.count("encrypting for them stalls") == 1, "once per room"
    finally:
        await app.stop()


async def test_an_unusable_crypto_store_directory_is_a_clear_error(encrypted, caplog,
                                                                   tmp_path):
    caplog.set_level(logging.INFO, logger="matrixjobs.matrix")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    app = build_service(encrypted.config(store_dir=str(blocker / "crypto")))
    await app.start()
    try:
        await logged(caplog, f"cannot use the crypto store directory {blocker / 'crypto'}")
        assert "ERROR" in caplog.text and "login failed" not in caplog.text
        # The queue runs all the same.
        job = await app.submit("quick", [])
        assert (await final_state(app, job.id)).status == "completed"
    finally:
        await app.stop()


def modes(*paths: Path) -> dict[str, int]:
    return {path.name: stat.S_IMODE(path.stat().st_mode) for path in paths}


async def test_a_crypto_store_of_the_default_key_is_rekeyed_keeping_device_and_sessions(
        encrypted, caplog, monkeypatch):
    scene = encrypted
    alice = scene.alice
    assert alice is not None
    caplog.set_level(logging.INFO)
    umask = os.umask(0o022)  # a shell's, not systemd's
    crypto_dir = state_dir(scene.tmp_path) / "matrixjobs-crypto"
    try:
        # The store as the bot left it before: pickled with nio's default key, and files
        # as the umask made them.
        monkeypatch.setattr(session_module, "load_pickle_key",
                            lambda configured, key_file: PickleKey(DEFAULT_PICKLE_KEY, "nio"))
        app = await start_bot(scene.config())
        bot = app.components[0]
        device, identity = bot.client.device_id, bot.client.olm.account.identity_keys
        try:
            await scene.open_room()
            await alice.trust(scene.bot_id)
            before = await alice.send(scene.room, "!build quick")
            assert (await scene.reply_to(before, finished)).current.startswith("✅")
        finally:
            await app.stop()
        monkeypatch.undo()
        database = crypto_dir / f"{scene.bot_id}_{device}.db"
        old = DefaultStore(scene.bot_id, device, str(crypto_dir), DEFAULT_PICKLE_KEY)
        assert old.load_account().identity_keys == identity, "made with the default key"
        old.database.close()
        for path in [*crypto_dir.iterdir(), *state_dir(scene.tmp_path).glob("matrixjobs.db*")]:
            path.chmod(0o644)
        crypto_dir.chmod(0o755)

        app = await start_bot(scene.config())
        bot = app.components[0]
        try:
            assert f"re-keyed the crypto store {database}" in caplog.text
            assert bot.client.device_id == device, "the same device"
            assert bot.client.olm.account.identity_keys == identity, "the same keys"
            # The Megolm session received before the re-key still decrypts that command.
            raw = {e["event_id"]: e for e in await asyncio.to_thread(
                alice.http.timeline, scene.room, event_type="m.room.encrypted")}
            event = MegolmEvent.from_dict(raw[before])
            event.room_id = scene.room
            assert bot.client.decrypt_event(event).body == "!build quick"
            after = await alice.send(scene.room, "!build quick")
            assert (await scene.reply_to(after, finished)).current.startswith("✅")
        finally:
            await app.stop()
    finally:
        os.umask(umask)

    key_file = state_dir(scene.tmp_path) / "matrixjobs.pickle-key"
    key = key_file.read_text().strip()
    assert key not in caplog.text
    with pytest.raises(ValueError):
        DefaultStore(scene.bot_id, device, str(crypto_dir), DEFAULT_PICKLE_KEY).load_account()
    private = [key_file, *crypto_dir.iterdir(), *state_dir(scene.tmp_path).glob("matrixjobs.db*")]
    assert modes(*private) == {path.name: 0o600 for path in private}
    assert modes(crypto_dir) == {crypto_dir.name: 0o700}

    # Another key (a changed MATRIXJOBS_PICKLE_KEY): a clear error, and nothing changes.
    before_files = {path.name: path.read_bytes() for path in crypto_dir.iterdir()}
    config = scene.config()
    config.matrix._pickle_key = SecretStr("not-the-key-the-store-was-made-with")
    app = build_service(config)
    await app.start()
    try:
        await logged(caplog, f"the crypto store {database} does not open with the configured "
                             "pickle key")
        assert "(the key from MATRIXJOBS_PICKLE_KEY)" in caplog.text
        assert "not-the-key-the-store" not in caplog.text
        assert not app.components[0].synced.is_set()
    finally:
        await app.stop()
    assert saved_device(scene.tmp_path) == device
    assert {path.name: path.read_bytes() for path in crypto_dir.iterdir()} == before_files


def saved_device(tmp_path: Path) -> str:
    """The device id the bot saved in its SQLite store."""
    with contextlib.closing(sqlite3.connect(state_dir(tmp_path) / "matrixjobs.db")) as db:
        return str(db.execute("SELECT value FROM settings WHERE key = 'matrix.device_id'")
                   .fetchone()[0])

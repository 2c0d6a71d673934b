"""The bot in end-to-end encrypted rooms, against a real Synapse, with a person whose own
client (matrix-nio with the e2e extra) encrypts commands and decrypts the bot's messages."""

from __future__ import annotations

import asyncio
import logging
import stat
import time
from collections.abc import Callable
from typing import Any

import pytest
from helpers import make_config, python_target
from matrix_people import BotMessage, EncryptedPerson
from nio import ToDeviceMessage, ToDeviceResponse

from matrixjobs.app import App
from matrixjobs.service import build_service

pytestmark = pytest.mark.timeout(120)

STEPS = """
    import sys, time
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    for i in range(1, steps + 1):
        time.sleep(0.3)
        print(f"::progress {i}/{steps} step {i}", flush=True)
"""
TARGETS = {
    "quick": python_target("print('::progress 1/1 done')"),
    "slow": python_target(STEPS, args_pattern=r"\d{1,2}"),
}
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
            targets=TARGETS,
        )

    async def open_room(self) -> str:
        assert self.alice is not None
        self.room = await self.alice.create_encrypted_room([self.bot_id])
        deadline = time.monotonic() + 30
        while self.bot_id not in await asyncio.to_thread(self.alice.http.members, self.room):
            assert time.monotonic() < deadline, "the bot never joined"
            await asyncio.sleep(0.2)
        return self.room

    async def reply_to(self, command: str, final: Callable[[str], bool] = lambda b: True,
                       timeout: float = 30.0) -> BotMessage:
        assert self.alice is not None
        deadline = time.monotonic() + timeout
        while True:
            for message in self.alice.messages_of(self.room, self.bot_id):
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
    await scene.alice.close()


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
    finally:
        await app.stop()

    store_dir = scene.tmp_path / "matrixjobs-crypto"
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
        assert len(builds) == 2 and len(await app.batches()) == 1, "nothing ran twice"
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
        (device,) = await alice.devices_of(scene.bot_id)
        if alice.client.olm.session_store.get(device.curve25519) is None:
            await alice.client.keys_claim({scene.bot_id: [device.id]})
        olm_session = alice.client.olm.session_store.get(device.curve25519)
        content = alice.client.olm._olm_encrypt(olm_session, device, "m.room_key", room_key)
        sent = await alice.client.to_device(
            ToDeviceMessage("m.room.encrypted", scene.bot_id, device.id, content))
        assert isinstance(sent, ToDeviceResponse), sent

        message = await scene.reply_to(command, finished)
        assert message.current.startswith("✅") and "quick" in message.current
        assert f"decrypted {command}" in caplog.text
        assert len(await app.jobs()) == 1
    finally:
        await app.stop()

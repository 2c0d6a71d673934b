"""Rules and approvals through the bot's room path (found by the #19 review): parse ->
Callbacks -> App -> edit scheduler, with a real App on SQLite and a sender that records
what would be sent; no homeserver (the homeserver URL points at a closed port, as
tests/test_fuzz_room_commands.py does)."""
from __future__ import annotations

import asyncio
import json
from typing import Any

from helpers import make_config, python_target
from nio import ReactionEvent, RoomMessageText

from matrixjobs.app import App
from matrixjobs.audit import AuditQuery
from matrixjobs.matrix.bot import MatrixBot
from matrixjobs.models import Status

ROOM = "!room:example.org"
ALICE, BOB, LEAD = "@alice:example.org", "@bob:example.org", "@lead:example.org"
SLOW = python_target("import time; time.sleep(30)")
QUICK = python_target("print('ok')")


class RecordingSender:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, room_id, content, txn_id):
        self.sent.append(content)
        return f"$sent{len(self.sent)}"


class Room:
    def __init__(self, app: App, bot: MatrixBot, sender: RecordingSender) -> None:
        self.app, self.bot, self.sender, self.count = app, bot, sender, 0
        self.events = app.monitor.subscribe()  # what MatrixBot._follow_progress reads

    async def say(self, sender: str, body: str) -> list[str]:
        self.count += 1
        event = RoomMessageText.from_dict({
            "type": "m.room.message", "event_id": f"$cmd{self.count}", "sender": sender,
            "origin_server_ts": 1, "content": {"msgtype": "m.text", "body": body}})
        return await self._handle(event)

    async def react(self, sender: str, on_event: str, key: str) -> list[str]:
        self.count += 1
        event = ReactionEvent.from_dict({
            "type": "m.reaction", "event_id": f"$re{self.count}", "sender": sender,
            "origin_server_ts": 1, "content": {"m.relates_to": {
                "rel_type": "m.annotation", "event_id": on_event, "key": key}}})
        return await self._handle(event)

    async def _handle(self, event) -> list[str]:
        before = len(self.sender.sent)
        await self.bot.callbacks.on_event(ROOM, event)
        await asyncio.sleep(0.6)  # the first message waits up to 0.5 s
        for update in self.events.take_all():  # as MatrixBot._follow_progress does
            if self.bot.scheduler.tracks(update.id):
                self.bot.scheduler.update(update)
        await self.bot.scheduler.flush(5.0)
        return [c["body"] for c in self.sender.sent[before:]]


async def open_room(tmp_path, **sections) -> Room:
    matrix = {"homeserver": "http://127.0.0.1:9", "user_id": "@bot:example.org",
              "rate_per_s": 0, **sections.pop("matrix", {})}
    config = make_config(tmp_path, api={"enabled": False}, matrix=matrix, **sections)
    app = App(config)
    await app.start()
    bot = MatrixBot(app, config.matrix, config.progress.interval_ms)
    sender = RecordingSender()
    bot.scheduler.sender = sender
    return Room(app, bot, sender)


async def close(room: Room) -> None:
    await room.bot.client.close()
    await room.app.stop()


async def test_an_approver_who_may_not_run_anything_can_approve(tmp_path):
    """The issue's own example: approvers = ["@lead:example.org"], a lead who does not run
    deploys. Observed: '⛔ You are not allowed to run jobs here.' and the ✅ is ignored."""
    room = await open_room(tmp_path, access={"allowed_users": [ALICE]},
                           targets={"deploy": {**QUICK, "approvals": 1, "approvers": [LEAD]}})
    try:
        await room.say(ALICE, "!build deploy")
        message_id = "$sent1"
        await room.react(LEAD, message_id, "✅")
        assert (await room.app.status("j1")).approval.approved_by == [LEAD], "✅ ignored"
    finally:
        await close(room)


async def test_an_approver_who_may_not_run_anything_can_say_approve(tmp_path):
    room = await open_room(tmp_path, access={"allowed_users": [ALICE]},
                           targets={"deploy": {**QUICK, "approvals": 1, "approvers": [LEAD]}})
    try:
        await room.say(ALICE, "!build deploy")
        replies = await room.say(LEAD, "!approve j1")
        assert (await room.app.status("j1")).approval.approved_by == [LEAD], replies
    finally:
        await close(room)


async def test_a_cancelled_held_job_does_not_say_awaiting_approval(tmp_path):
    room = await open_room(tmp_path, access={"allowed_users": [ALICE, BOB]},
                           targets={"deploy": {**QUICK, "approvals": 1}})
    try:
        await room.say(ALICE, "!build deploy")
        await room.say(ALICE, "!cancel j1")
        assert (await room.app.status("j1")).status is Status.CANCELLED
        edits = [c["m.new_content"]["body"] for c in room.sender.sent if "m.new_content" in c]
        assert edits and edits[-1].startswith("🚫"), edits
        assert "awaiting approval" not in edits[-1], edits[-1]
    finally:
        await close(room)


async def test_status_names_the_configured_prefix(tmp_path):
    room = await open_room(tmp_path, matrix={"command_prefix": "."},
                           access={"allowed_users": [ALICE]},
                           targets={"deploy": {**QUICK, "approvals": 1}})
    try:
        await room.say(ALICE, ".build deploy")
        [reply] = await room.say(ALICE, ".status j1")
        assert "!approve" not in reply and ".approve j1" in reply, reply
    finally:
        await close(room)


async def test_an_unrelated_targets_alias_does_not_block_every_build(tmp_path):
    """'lobby' is limited to a room alias; 'docs' has no rule at all. While the alias
    cannot be resolved (homeserver away for a moment), !build docs must still work."""
    room = await open_room(tmp_path, access={"allowed_users": [ALICE]},
                           targets={"docs": QUICK,
                                    "lobby": {**QUICK, "rooms": ["#lobby:example.org"]}})
    try:
        replies = await room.say(ALICE, "!build docs")
        assert await room.app.jobs(), f"no job; replies: {replies}"
    finally:
        await close(room)


async def test_a_power_level_on_one_target_does_not_block_every_build(tmp_path):
    room = await open_room(tmp_path, access={"allowed_users": [ALICE]},
                           targets={"docs": QUICK, "deploy": {**QUICK, "power_level": 50,
                                                              "rooms": [ROOM]}})
    try:
        replies = await room.say(ALICE, "!build docs")
        assert await room.app.jobs(), f"no job; replies: {replies}"
    finally:
        await close(room)


async def test_targets_marks_what_needs_approval(tmp_path):
    """Issue #19 part 1: '!targets shows each user only what they may run there, marking
    what needs approval'."""
    room = await open_room(tmp_path, access={"allowed_users": [ALICE]},
                           targets={"deploy": {**QUICK, "approvals": 1}, "docs": QUICK})
    try:
        [reply] = await room.say(ALICE, "!targets")
        deploy_line = next(line for line in reply.splitlines() if "deploy" in line)
        docs_line = next(line for line in reply.splitlines() if "docs" in line)
        assert deploy_line.replace("deploy", "") != docs_line.replace("docs", ""), reply
    finally:
        await close(room)


async def test_a_stranger_is_refused_and_recorded_now_and_then(tmp_path):
    room = await open_room(tmp_path, access={"allowed_users": [ALICE]},
                           targets={"docs": QUICK})
    try:
        first = await room.say("@eve:example.org", "!build docs")
        again = await room.say("@eve:example.org", "!build docs")
        assert (first, again) == (["⛔ You are not allowed to run jobs here."], [])
        refused = [r for r in await room.app.audit(AuditQuery()) if r.action == "refused"]
        assert [(r.actor, r.via, r.room_id, json.loads(r.detail)["command"])
                for r in refused] == [("@eve:example.org", "room", ROOM, "build")]
        assert not await room.app.jobs()
    finally:
        await close(room)

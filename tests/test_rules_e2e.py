"""Per-target rules against a real Synapse: power levels read from the room as it is now
(room version 12's creators outrank them all, in an older room the creator has 100), rooms
by id and by alias, `!targets` per person, and the API refusing room-only targets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import quote

import pytest
from helpers import MATRIX_TARGETS, make_config, python_target
from matrix_people import Person
from test_matrix_e2e import eventually, in_thread, start_bot

from matrixjobs.app import App
from matrixjobs.models import Status

pytestmark = pytest.mark.timeout(180)

SLOW_DEPLOY = python_target("import time; print('deploying', flush=True); time.sleep(60)",
                            max_retries=0)


def finished(body: str) -> bool:
    return body.startswith(("✅", "❌", "🚫", "⛔", "⚠️"))


class Room:
    def __init__(self, owner: Person, room_id: str) -> None:
        self.owner = owner
        self.room_id = room_id

    def levels(self) -> dict[str, Any]:
        return dict(self.owner.call("GET", f"/_matrix/client/v3/rooms/{quote(self.room_id)}"
                                           "/state/m.room.power_levels/"))

    def set_level(self, user: str, level: int | None) -> None:
        """Give `user` a level, or (None) take their entry out of `users`: as Element's
        "reset" does, and what matrix-nio's merged room state does not see."""
        levels = self.levels()
        users = dict(levels.get("users", {}))
        if level is None:
            users.pop(user, None)
        else:
            users[user] = level
        self.owner.call("PUT", f"/_matrix/client/v3/rooms/{quote(self.room_id)}"
                               "/state/m.room.power_levels/", {**levels, "users": users})


async def test_rules_follow_the_rooms_power_levels_rooms_and_people(synapse, tmp_path):
    bot = synapse.register("rulesbot", password="bot-password")
    alice = Person.register(synapse, "rulesalice")
    bob = Person.register(synapse, "rulesbob")
    carol = Person.register(synapse, "rulescarol")
    alias = f"#lobby-rules:{synapse.server_name}"
    # power_level counts only in rooms the target names: these two, by alias.
    deploys = [f"#rules-v12:{synapse.server_name}", f"#rules-v11:{synapse.server_name}"]
    ruled = {"rooms": deploys, "power_level": 50}
    config = make_config(
        tmp_path,
        matrix={"homeserver": synapse.base_url, "user_id": bot["user_id"],
                "password": "bot-password", "rate_per_s": 0},
        access={"allowed_users": [alice.user_id, bob.user_id, carol.user_id]},
        progress={"interval_ms": 200},
        api={"token": "rules-token"},
        targets={"quick": MATRIX_TARGETS["quick"],
                 "deploy": {**MATRIX_TARGETS["quick"], **ruled},
                 "slowdeploy": {**SLOW_DEPLOY, **ruled},
                 "lobby": {**MATRIX_TARGETS["quick"], "rooms": [alias]},
                 "bobs": {**MATRIX_TARGETS["quick"], "allowed_users": [bob.user_id]}},
    )
    app = await start_bot(config)
    try:
        members = [bot["user_id"], bob.user_id, carol.user_id]
        # Room version 12 (Synapse's default): Alice created it, so she outranks every
        # level, and she may not even appear in m.room.power_levels.
        v12 = Room(alice, await in_thread(alice.create_room, members))
        for person in (bob, carol):
            await in_thread(person.join, v12.room_id)
        await eventually(lambda: bot["user_id"] in alice.members(v12.room_id))
        assert alice.user_id not in v12.levels().get("users", {})
        # An older room version: the creator's power is her entry, 100.
        v11 = Room(alice, await in_thread(_create_room, alice, members, "11"))
        for person in (bob, carol):
            await in_thread(person.join, v11.room_id)
        await eventually(lambda: bot["user_id"] in alice.members(v11.room_id))
        for room, name in ((v12, deploys[0]), (v11, deploys[1])):
            await in_thread(alice.call, "PUT",
                            f"/_matrix/client/v3/directory/room/{quote(name)}",
                            {"room_id": room.room_id})

        async def say(who: Person, room: Room, text: str) -> str:
            return await answer(alice, bot["user_id"], who, room, text)

        assert (await say(bob, v12, "!build deploy")).startswith(
            "⛔ deploy needs power level 50 in this room (yours: 0)")
        assert (await say(alice, v12, "!build deploy")).startswith("✅")

        # Promoted: Bob may; demoted by taking him out of `users`: at once he may not.
        await in_thread(v12.set_level, bob.user_id, 50)
        assert (await say(bob, v12, "!build deploy")).startswith("✅")
        await in_thread(bob.send, v12.room_id, "!build slowdeploy")
        job = await _running(app, "slowdeploy")
        await in_thread(v12.set_level, bob.user_id, None)
        assert (await say(bob, v12, "!build deploy")).startswith(
            "⛔ deploy needs power level 50 in this room (yours: 0)")
        # Carol may not cancel Bob's deploy; Bob may always cancel his own.
        assert (await say(carol, v12, f"!cancel {job}")).startswith(
            "⛔ slowdeploy needs power level 50 in this room (yours: 0)")
        assert "cancel" in (await say(bob, v12, f"!cancel {job}")).lower()

        # !targets shows each person what they may run here.
        listed = await say(carol, v12, "!targets")
        assert "quick" in listed and "deploy" not in listed and "bobs" not in listed
        assert "lobby" not in listed  # only from its room
        assert "bobs" in await say(bob, v12, "!targets")
        assert (await say(carol, v12, "!build bobs")).startswith("⛔ you may not run bobs")

        assert v11.levels()["users"][alice.user_id] == 100
        assert (await say(alice, v11, "!build deploy")).startswith("✅")
        assert (await say(bob, v11, "!build deploy")).startswith("⛔ deploy needs power")

        # rooms by alias: the alias names v11 now.
        assert (await say(alice, v11, "!build lobby")).startswith(
            "⛔ lobby cannot be run from this room")
        await in_thread(alice.call, "PUT", f"/_matrix/client/v3/directory/room/{quote(alias)}",
                        {"room_id": v11.room_id})
        assert (await say(alice, v11, "!build lobby")).startswith(
            "⛔ lobby cannot be run from this room")  # resolved a minute ago: still cached
        app.components[0].callbacks.places._resolved.clear()  # as a minute later
        assert (await say(alice, v11, "!build lobby")).startswith("✅")

        # A room of Bob's own, where he outranks everyone, is not one the target names.
        own = Room(bob, await in_thread(bob.create_room, [bot["user_id"], alice.user_id]))
        await in_thread(alice.join, own.room_id)
        await eventually(lambda: bot["user_id"] in bob.members(own.room_id))
        assert (await say(bob, own, "!build deploy")).startswith(
            "⛔ deploy cannot be run from this room")
    finally:
        await app.stop()


async def test_approvals_are_given_and_refused_in_the_room(synapse, tmp_path):
    bot = synapse.register("approvebot", password="bot-password")["user_id"]
    alice, bob, carol = (Person.register(synapse, f"approve{name}")
                         for name in ("alice", "bob", "carol"))
    quick = MATRIX_TARGETS["quick"]
    config = make_config(
        tmp_path,
        matrix={"homeserver": synapse.base_url, "user_id": bot, "password": "bot-password",
                "rate_per_s": 0},
        access={"allowed_users": [alice.user_id, bob.user_id, carol.user_id]},
        progress={"interval_ms": 200},
        targets={"deploy": {**quick, "approvals": 1}, "twice": {**quick, "approvals": 2}})
    app = await start_bot(config)
    try:
        room = Room(alice, await in_thread(alice.create_room, [bot, bob.user_id,
                                                               carol.user_id]))
        for person in (bob, carol):
            await in_thread(person.join, room.room_id)
        await eventually(lambda: bot in alice.members(room.room_id))

        async def say(who: Person, text: str, done: Callable[[str], bool] | None = None) -> str:
            return await answer(alice, bot, who, room, text, done)

        command = await in_thread(alice.send, room.room_id, "!build deploy")
        held = await eventually(lambda: _message(alice, bot, room, command,
                                                 lambda body: "awaiting" in body))
        assert held.body.startswith("⏳ deploy (j1) — awaiting approval 0/1")
        assert "React ✅ or !approve j1; 👎 or !deny j1 [reason] refuses" in held.body
        # Alice's own ✅ does not count; Bob's does, and the same message shows the run.
        await in_thread(alice.react, room.room_id, held.event_id, "✅")
        await asyncio.sleep(1.0)
        assert (await app.status("j1")).status is Status.PENDING
        await in_thread(bob.react, room.room_id, held.event_id, "✅\ufe0f")
        ran = await eventually(lambda: _message(alice, bot, room, command, finished))
        assert ran.event_id == held.event_id
        assert ran.body.startswith("✅ deploy (j1) — completed")
        assert f"👍 approved by {bob.user_id}" in ran.body

        assert (await say(alice, "!build twice", lambda body: "awaiting" in body)).startswith(
            "⏳ twice (j2) — awaiting approval 0/2")
        assert (await say(alice, "!approve j2")) == (
            "⛔ you asked for it: your own approval does not count")
        assert (await say(bob, "!approve j2")).startswith("⏳ j2 twice — awaiting approval 1/2")
        assert (await say(carol, "!deny j2 not before the release")).startswith(
            f"🚫 j2 twice — denied by {carol.user_id}: not before the release")
        assert (await app.status("j2")).status is Status.CANCELLED
        assert (await say(bob, "!approve j2")).startswith(
            f"⚠️ j2 is already denied by {carol.user_id}")

        # 👎 on the message denies it, without a reason.
        command = await in_thread(alice.send, room.room_id, "!build deploy")
        held = await eventually(lambda: _message(alice, bot, room, command,
                                                 lambda body: "awaiting" in body))
        await in_thread(carol.react, room.room_id, held.event_id, "👎🏽")
        denied = await eventually(lambda: _message(alice, bot, room, command,
                                                   lambda body: body.startswith("🚫")))
        assert denied.body.startswith(f"🚫 deploy (j3) — denied by {carol.user_id}")
    finally:
        await app.stop()


async def test_a_personal_token_is_given_only_in_a_direct_room(synapse, tmp_path):
    bot = synapse.register("tokenbot", password="bot-password")["user_id"]
    alice, bob = Person.register(synapse, "tokenalice"), Person.register(synapse, "tokenbob")
    config = make_config(
        tmp_path, matrix={"homeserver": synapse.base_url, "user_id": bot,
                          "password": "bot-password", "rate_per_s": 0},
        access={"allowed_users": [alice.user_id, bob.user_id]},
        targets={"quick": MATRIX_TARGETS["quick"]})
    app = await start_bot(config)
    try:
        direct = Room(alice, await in_thread(alice.create_room, [bot]))
        group = Room(alice, await in_thread(alice.create_room, [bot, bob.user_id]))
        await in_thread(bob.join, group.room_id)
        for room in (direct, group):
            await eventually(lambda room=room: bot in alice.members(room.room_id))

        async def say(room: Room, text: str) -> str:
            return await answer(alice, bot, alice, room, text)

        refused = await say(group, "!token laptop")
        assert refused.startswith("⚠️ ask for a token in a direct room with me")
        given = await say(direct, "!token laptop")
        assert given.startswith("🔑 Your new token laptop (shown once; it acts as you):")
        assert "⚠️ This room is not encrypted" in given
        [token] = [word for word in given.split() if word.startswith("mjp_")]
        assert await app.token_owner(token) == alice.user_id
        assert (await say(group, "!tokens")).startswith("Your tokens:\n• laptop · made ")
        assert await say(group, "!revoke laptop") == "🗑️ Token laptop revoked: it no longer works."
        assert await app.token_owner(token) is None
    finally:
        await app.stop()


async def test_the_api_refuses_room_only_targets_with_403(api_service):
    quick = MATRIX_TARGETS["quick"]
    app, client = await api_service(token="rules-token", targets={
        "deploy": {**quick, "rooms": ["!r:example.org"], "power_level": 50},
        "lobby": {**quick, "rooms": ["!r:example.org"]},
        "quick": quick})
    for body, path in (({"target": "deploy"}, "/v1/jobs"), ({"target": "lobby"}, "/v1/jobs"),
                       ({"targets": ["quick", "deploy"]}, "/v1/batches")):
        refused = await client.post(path, json=body)
        assert refused.status_code == 403, body
        assert refused.json()["error"]["code"] == "forbidden"
    assert refused.json()["error"]["message"] == "deploy can only be started from a Matrix room"
    assert (await client.post("/v1/jobs", json={"target": "quick"})).status_code == 201
    assert await app.jobs() != [] and all(job.name == "quick" for job in await app.jobs())


async def answer(reader: Person, bot: str, who: Person, room: Room, text: str,
                 done: Callable[[str], bool] | None = None) -> str:
    """The bot's reply to `text`, as it reads once `done` (default: for a !build, once it
    shows how the job ended; else at once)."""
    command = await in_thread(who.send, room.room_id, text)
    if done is None:
        done = finished if text.startswith("!build") else (lambda body: True)
    return str(await eventually(lambda: _reply(reader, bot, room, command, done)))


class Shown(NamedTuple):
    event_id: str  # the bot's message
    body: str  # as its latest edit has it


def _message(reader: Person, bot: str, room: Room, command: str,
             done: Callable[[str], bool]) -> Shown | None:
    """The bot's reply to `command` once its latest edit is `done`."""
    events = reader.timeline(room.room_id, 100)
    for event in events:
        relates = event.get("content", {}).get("m.relates_to", {})
        if (event["sender"] == bot and "m.new_content" not in event["content"]
                and relates.get("m.in_reply_to", {}).get("event_id") == command):
            latest = _latest(events, event)
            if done(latest):
                return Shown(event["event_id"], latest)
    return None


def _reply(reader: Person, bot: str, room: Room, command: str,
           done: Callable[[str], bool]) -> str | None:
    shown = _message(reader, bot, room, command, done)
    return None if shown is None else shown.body


def _create_room(owner: Person, invite: list[str], version: str) -> str:
    body = {"preset": "private_chat", "invite": invite, "room_version": version}
    return str(owner.call("POST", "/_matrix/client/v3/createRoom", body)["room_id"])


def _latest(events: list[dict[str, Any]], original: dict[str, Any]) -> str:
    body = str(original["content"]["body"])
    for event in events:  # oldest first
        content = event.get("content", {})
        relates = content.get("m.relates_to", {})
        if relates.get("rel_type") == "m.replace" and relates.get("event_id") == \
                original["event_id"]:
            body = str(content["m.new_content"]["body"])
    return body


async def _running(app: App, name: str) -> str:
    """The id of the job of target `name` once it runs."""
    for _ in range(300):
        for job in await app.jobs(limit=5):
            if job.name == name and job.status is Status.PROCESSING:
                return job.id
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} never ran")

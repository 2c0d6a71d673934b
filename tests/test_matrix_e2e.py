"""The bot against a real Synapse, driven by people with their own clients."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx2
import pytest
from helpers import MATRIX_TARGETS, make_config, python_target
from matrix_people import BotMessage, Person, bot_messages
from nio import Event, ReactionEvent
from prometheus_client.parser import text_string_to_metric_families

from matrixjobs.api import ApiServer
from matrixjobs.app import App
from matrixjobs.models import Worker
from matrixjobs.service import build_service

pytestmark = pytest.mark.timeout(120)

_names = iter(range(10_000))


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(function, *args)


async def eventually(check: Callable[[], Any], timeout: float = 30.0, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await in_thread(check)
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {check}")
        await asyncio.sleep(every)


class Scene:
    """A bot user, an allowed person, a stranger and a room with all of them in it."""

    def __init__(self, server, tmp_path) -> None:
        n = next(_names)
        self.server = server
        self.tmp_path = tmp_path
        self.bot_name = f"bot{n}"
        bot = server.register(self.bot_name, password="bot-password")
        self.bot_id = bot["user_id"]
        self.alice = Person.register(server, f"alice{n}")
        self.mallory = Person.register(server, f"mallory{n}")
        self.room = ""

    def config(self, **matrix: Any):
        return make_config(
            self.tmp_path,
            matrix={"homeserver": self.server.base_url, "user_id": self.bot_id,
                    "password": "bot-password", "rate_per_s": 0, **matrix},
            access={"allowed_users": [self.alice.user_id]},
            progress={"interval_ms": 200},
            targets={**MATRIX_TARGETS, **flaky_targets(self.tmp_path)},
        )

    async def open_room(self) -> str:
        self.room = await in_thread(self.alice.create_room, [self.bot_id, self.mallory.user_id])
        await in_thread(self.mallory.join, self.room)
        await eventually(lambda: self.bot_id in self.alice.members(self.room))
        return self.room

    async def say(self, text: str, who: Person | None = None) -> str:
        return await in_thread((who or self.alice).send, self.room, text)

    async def messages(self) -> list[BotMessage]:
        events = await in_thread(self.alice.timeline, self.room)
        messages, strays = bot_messages(events, self.bot_id)
        assert strays == [], "every edit must target an original message of the bot"
        return messages

    async def reply_to(self, command: str, final: Callable[[str], bool] = lambda b: True,
                       timeout: float = 30.0) -> BotMessage:
        async def check() -> BotMessage | None:
            for message in await self.messages():
                if message.reply_to == command and final(message.current):
                    return message
            return None

        deadline = time.monotonic() + timeout
        while (found := await check()) is None:
            assert time.monotonic() < deadline, f"no reply to {command}"
            await asyncio.sleep(0.2)
        return found


def flaky_targets(tmp_path) -> dict[str, Any]:
    """`flaky` fails while tmp_path/broken exists; `second_try` fails its first attempt."""
    broken, tried = str(tmp_path / "broken"), str(tmp_path / "tried")
    return {
        "flaky": python_target(f"import os, sys; sys.exit(3 if os.path.exists({broken!r}) "
                               "else 0)", max_retries=0),
        "second_try": python_target(f"""
            import os, sys
            if not os.path.exists({tried!r}):
                open({tried!r}, "w").close()
                sys.exit(4)
        """, max_retries=2),
    }


async def start_bot(config) -> App:
    app = build_service(config)
    await app.start()
    bot = app.components[0]
    await asyncio.wait_for(bot.synced.wait(), 30)
    return app


@pytest.fixture
async def scene(synapse, tmp_path):
    scene = Scene(synapse, tmp_path)
    app = await start_bot(scene.config())
    await scene.open_room()
    scene.app = app
    yield scene
    await app.stop()


def finished(body: str) -> bool:
    return body.startswith(("✅", "❌", "🚫"))


async def test_build_keeps_one_message_current_until_it_completes(scene):
    command = await scene.say("!build slow 6")
    message = await scene.reply_to(command, finished)
    assert message.current.startswith("✅")
    assert "100%" in message.current and "slow 6" in message.current
    assert "🟩" * 10 in message.current
    assert message.original["content"]["msgtype"] == "m.notice"
    assert len(message.edits) >= 2, "progress should have been shown while it ran"
    seen = "".join(body[0] for body in message.bodies)
    assert "🔄" in seen and seen.endswith("✅")
    assert any("/6" in body for body in message.bodies[:-1])
    for edit in message.edits:
        content = edit["content"]
        assert content["body"] == "* " + content["m.new_content"]["body"]
        assert content["m.new_content"]["formatted_body"]
    jobs = [m for m in await scene.messages() if m.reply_to == command]
    assert len(jobs) == 1
    expected = {"sent": 1, "edited": len(message.edits)}
    for _ in range(50):  # the bot counts a send once its answer is back: a moment after
        if (counted := await matrix_events(scene.app)) == expected:
            break
        await asyncio.sleep(0.1)
    assert counted == expected


async def matrix_events(app: App) -> dict[str, float]:
    """The bot's sends as GET /metrics counts them."""
    [api] = [c for c in app.components if isinstance(c, ApiServer)]
    async with httpx2.AsyncClient(base_url=api.url) as client:
        text = (await client.get("/metrics")).text
    [family] = [f for f in text_string_to_metric_families(text)
                if f.name == "matrixjobs_matrix_events"]
    return {sample.labels["kind"]: sample.value for sample in family.samples
            if sample.name.endswith("_total")}


async def test_failed_build_shows_the_output_tail(scene):
    command = await scene.say("!build broken")
    message = await scene.reply_to(command, finished)
    assert message.current.startswith("❌")
    assert "exit code 3" in message.current and "compiler exploded" in message.current
    assert "<pre><code>" in message.current_html
    command = await scene.say("!logs j1 2")
    reply = await scene.reply_to(command)
    assert reply.current == ("📜 j1: the last 2 lines of its log\n```\ncompiler exploded\n"
                             "── failed: exit code 3 ──\n```")
    assert "<pre><code>compiler exploded\n" in reply.current_html
    # The whole log as a file, in a thread under the progress message.
    [attachment] = await eventually(lambda: [
        event for event in scene.alice.timeline(scene.room)
        if event["content"].get("msgtype") == "m.file"])
    content = attachment["content"]
    assert attachment["sender"] == scene.bot_id
    assert content["body"] == content["filename"] == "j1-broken.log"
    assert content["m.relates_to"]["rel_type"] == "m.thread"
    assert content["m.relates_to"]["event_id"] == message.event_id
    data = await in_thread(scene.alice.download, content["url"])
    assert data == (await scene.app.log("j1")).encode()
    assert content["info"] == {"mimetype": "text/plain", "size": len(data)}


async def test_batch_shows_counts_and_errors(scene):
    command = await scene.say("!batch quick broken quick")
    message = await scene.reply_to(command, finished)
    assert message.current.startswith("❌")
    assert "3/3" in message.current and "✅ 2" in message.current and "❌ 1" in message.current
    assert "compiler exploded" in message.current or "exit code 3" in message.current


async def test_unknown_target_and_bad_arguments_get_clear_errors(scene):
    command = await scene.say("!build nope")
    reply = await scene.reply_to(command)
    assert "unknown target 'nope'" in reply.current and "quick" in reply.current
    command = await scene.say("!build slow lots")
    reply = await scene.reply_to(command)
    assert "not allowed for 'slow'" in reply.current
    command = await scene.say("!batch")
    assert "usage" in (await scene.reply_to(command)).current
    command = await scene.say("!frobnicate")
    assert "!help" in (await scene.reply_to(command)).current
    assert await scene.app.jobs() == []


async def test_denied_user_gets_a_refusal_and_nothing_runs(scene):
    command = await scene.say("!build quick", who=scene.mallory)
    reply = await scene.reply_to(command)
    assert reply.current.startswith("⛔")
    await asyncio.sleep(0.5)
    assert await scene.app.jobs() == []


async def test_editing_a_command_does_not_start_a_second_job(scene):
    command = await scene.say("!build slow 3")
    await scene.reply_to(command)
    await in_thread(scene.alice.edit, scene.room, command, "!build slow 4")
    await scene.reply_to(command, finished)
    await asyncio.sleep(1.0)
    assert len(await scene.app.jobs()) == 1


async def test_cancel_stops_the_job_and_the_message_says_so(scene):
    command = await scene.say("!build slow 30")
    await scene.reply_to(command, lambda body: body.startswith("🔄"))
    [job] = await scene.app.jobs()
    cancel = await scene.say(f"!cancel {job.id}")
    assert "Cancelled" in (await scene.reply_to(cancel)).current
    message = await scene.reply_to(command, finished)
    assert message.current.startswith("🚫")


async def test_info_commands_answer(scene):
    command = await scene.say("!help")
    help_text = (await scene.reply_to(command)).current
    assert "!build TARGET" in help_text and "!rerun ID" in help_text
    command = await scene.say("!targets")
    reply = (await scene.reply_to(command)).current
    assert "slow" in reply and "Takes a while" in reply
    command = await scene.say("!build quick")
    await scene.reply_to(command, finished)
    command = await scene.say("!jobs")
    assert "j1" in (await scene.reply_to(command)).current
    command = await scene.say("!status j1")
    assert "✅" in (await scene.reply_to(command)).current
    command = await scene.say("!status")
    assert "Nothing is running" in (await scene.reply_to(command)).current


async def test_workers_command_lists_this_node_and_a_silent_worker(scene):
    now = time.time()
    await scene.app.store.register_worker(Worker(
        id="gone:1:ab", name="build-02", host="gone", pid=1, role="worker", labels=["gpu"],
        slots=2, version="0.0.9", started_at=now - 3600, heartbeat_at=now - 125))
    command = await scene.say("!workers")
    reply = (await scene.reply_to(command)).current
    here = scene.app.config.worker.name
    assert f"🟢 {here} 0/4 running · beat " in reply, reply
    assert "🔴 build-02 (gpu) silent for 2m" in reply, reply


async def test_invite_sent_while_the_bot_was_offline_is_accepted(synapse, tmp_path):
    scene = Scene(synapse, tmp_path)
    room = await in_thread(scene.alice.create_room, [scene.bot_id])
    scene.room = room
    app = await start_bot(scene.config())
    try:
        await eventually(lambda: scene.bot_id in scene.alice.members(room))
        command = await scene.say("!build quick")
        assert (await scene.reply_to(command, finished)).current.startswith("✅")
    finally:
        await app.stop()


async def test_invite_from_a_stranger_is_ignored(synapse, tmp_path):
    scene = Scene(synapse, tmp_path)
    app = await start_bot(scene.config())
    try:
        room = await in_thread(scene.mallory.create_room, [scene.bot_id])
        await asyncio.sleep(2.0)
        assert scene.bot_id not in await in_thread(scene.mallory.members, room)
    finally:
        await app.stop()


async def test_old_commands_are_not_replayed_after_a_restart(synapse, tmp_path):
    scene = Scene(synapse, tmp_path)
    config = scene.config()
    app = await start_bot(config)
    await scene.open_room()
    command = await scene.say("!build quick")
    message = await scene.reply_to(command, finished)
    await app.stop()
    await scene.say("!build quick")  # sent while the bot is down: before it started
    await in_thread(scene.alice.react, scene.room, message.event_id, "🔁")  # so is this
    app = await start_bot(config)
    try:
        await asyncio.sleep(2.0)
        assert len(await app.jobs()) == 1
        assert await app.store.get_setting("matrix.device_id")
    finally:
        await app.stop()


async def test_restart_reuses_the_device(synapse, tmp_path):
    scene = Scene(synapse, tmp_path)
    config = scene.config()
    app = await start_bot(config)
    first = app.components[0].client.device_id
    await app.stop()
    app = await start_bot(config)
    try:
        assert app.components[0].client.device_id == first
    finally:
        await app.stop()
    devices = synapse.request("GET", "/_matrix/client/v3/devices",
                              token=synapse.login(scene.bot_name, "bot-password")["access_token"])
    ours = [d for d in devices["devices"] if d.get("display_name") == "matrixjobs"]
    assert [d["device_id"] for d in ours] == [first]  # one device, however many restarts


async def test_default_rate_limits_still_deliver_every_final_state(synapse_limited, tmp_path):
    scene = Scene(synapse_limited, tmp_path)
    for person in (scene.alice, scene.mallory):
        synapse_limited.exempt_from_rate_limit(person.user_id)  # only the bot is limited
    app = await start_bot(scene.config(rate_per_s=0.2, rate_burst=10))
    try:
        await scene.open_room()
        commands = [await scene.say("!build slow 4") for _ in range(4)]
        for command in commands:
            message = await scene.reply_to(command, finished, timeout=60)
            assert message.current.startswith("✅")
        events = [e for e in await in_thread(scene.alice.timeline, scene.room)
                  if e["sender"] == scene.bot_id]
        assert len(events) <= 4 * 6
    finally:
        await app.stop()


async def test_commands_sent_while_the_bot_was_out_of_the_room_are_not_run(scene):
    await in_thread(scene.alice.call, "POST",
                    f"/_matrix/client/v3/rooms/{scene.room}/kick", {"user_id": scene.bot_id})
    await eventually(lambda: scene.bot_id not in scene.alice.members(scene.room))
    await scene.say("!build quick")  # the bot is not there to see it
    await in_thread(scene.alice.call, "POST",
                    f"/_matrix/client/v3/rooms/{scene.room}/invite", {"user_id": scene.bot_id})
    await eventually(lambda: scene.bot_id in scene.alice.members(scene.room))
    command = await scene.say("!build quick")
    assert (await scene.reply_to(command, finished)).current.startswith("✅")
    assert len(await scene.app.jobs()) == 1


async def test_bot_logs_in_again_when_its_token_is_revoked(scene):
    await in_thread(scene.server.request, "POST", "/_matrix/client/v3/logout/all", {},
                    scene.app.components[0].client.access_token)
    command = await scene.say("!build quick")
    assert (await scene.reply_to(command, finished, timeout=60)).current.startswith("✅")


async def test_a_denied_user_cannot_flood_the_room_with_refusals(scene):
    commands = [await scene.say("!build quick", who=scene.mallory) for _ in range(5)]
    await scene.reply_to(commands[0])
    await asyncio.sleep(1.0)
    refusals = [m for m in await scene.messages() if m.reply_to in commands]
    assert len(refusals) == 1
    assert await scene.app.jobs() == []


async def test_reactions_rerun_and_cancel_for_allowed_users_only(scene):
    command = await scene.say("!build quick")
    first = await scene.reply_to(command, finished)
    bot = scene.app.components[0]
    as_bot = Person(scene.server, scene.bot_id, bot.client.access_token)
    # Ignored: a stranger's 🔁, another emoji, 🔁 on a message that is not a progress
    # message, the bot's own 🔁, and ❌ on a finished job.
    await in_thread(scene.mallory.react, scene.room, first.event_id, "🔁")
    await in_thread(scene.alice.react, scene.room, first.event_id, "👍")
    await in_thread(scene.alice.react, scene.room, command, "🔁")
    await in_thread(as_bot.react, scene.room, first.event_id, "🔁")
    await in_thread(scene.alice.react, scene.room, first.event_id, "❌")
    # Alice's 🔁 (as some clients send it, with U+FE0F) reruns it: a new progress message,
    # answering the old one.
    reaction = await in_thread(scene.alice.react, scene.room, first.event_id, "🔁\ufe0f")
    second = await scene.reply_to(first.event_id, finished)
    assert second.current.startswith("✅ quick (j2)")
    assert [(job.id, job.requester) for job in await scene.app.jobs()] == [
        ("j2", scene.alice.user_id), ("j1", scene.alice.user_id)]

    # The same reaction replayed (as a sync could), or taken back, starts or stops nothing.
    [source] = [e for e in await in_thread(scene.alice.timeline, scene.room, 50, "m.reaction")
                if e["event_id"] == reaction]
    replayed = Event.parse_event(source)
    assert isinstance(replayed, ReactionEvent)
    await bot.callbacks.on_event(scene.room, replayed)
    await in_thread(scene.alice.redact, scene.room, reaction)

    # ❌ on a running job's message: a stranger's does nothing, Alice's cancels it.
    command = await scene.say("!build slow 60")
    running = await scene.reply_to(command, lambda body: body.startswith("🔄"))
    await in_thread(scene.mallory.react, scene.room, running.event_id, "❌")
    await asyncio.sleep(1.0)
    assert (await scene.app.status("j3")).status == "processing"
    await in_thread(scene.alice.react, scene.room, running.event_id, "❌")
    assert (await scene.reply_to(command, finished)).current.startswith("🚫")
    await asyncio.sleep(1.0)
    assert len(await scene.app.jobs()) == 3
    answers = sorted(message.reply_to for message in await scene.messages())
    assert answers == sorted([command, first.reply_to, first.event_id]), "no other replies"


async def test_rerun_command_and_pings_for_failures_and_fixes_only(scene):
    broken = scene.tmp_path / "broken"
    broken.touch()
    command = await scene.say("!build flaky")
    assert (await scene.reply_to(command, finished)).current.startswith("❌")
    ping = await scene.reply_to(command, lambda body: body.startswith(scene.alice.user_id))
    assert "❌ flaky (j1) failed" in ping.current
    assert ping.original["content"]["m.mentions"] == {"user_ids": [scene.alice.user_id]}

    broken.unlink()
    fix = await scene.say("!rerun j1")
    assert (await scene.reply_to(fix, finished)).current.startswith("✅ flaky (j2)")
    ping = await scene.reply_to(fix, lambda body: body.startswith(scene.alice.user_id))
    assert "✅ flaky (j2) fixed, completed" in ping.current

    again = await scene.say("!rerun j2")
    await scene.reply_to(again, finished)
    retried = await scene.say("!build second_try")
    message = await scene.reply_to(retried, finished)
    assert message.current.startswith("✅") and "Passed on attempt 2 of 3" in message.current

    usage = await scene.say("!rerun")
    assert "usage: !rerun ID" in (await scene.reply_to(usage)).current
    unknown = await scene.say("!rerun j99")
    assert "no job j99" in (await scene.reply_to(unknown)).current
    denied = await scene.say("!rerun j1", who=scene.mallory)
    assert (await scene.reply_to(denied)).current.startswith("⛔")
    await asyncio.sleep(1.0)
    # A success like the time before, and a first run that needed a retry: no ping.
    assert [m.reply_to for m in await scene.messages()].count(again) == 1
    assert [m.reply_to for m in await scene.messages()].count(retried) == 1
    assert len(await scene.app.jobs()) == 4

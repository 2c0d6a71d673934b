"""Work no person asked for, queued on another node: two Apps on one PostgreSQL store (as
two `matrixjobs run` nodes). Node B queues a webhook's job with a room; the bot on node A
(the leader, which alone posts) must post its progress message at once, not at its next
look at the store (the fallback poll, every UNSENT_EVERY_S)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import final_state, make_config, python_target
from nio import MatrixRoom

from matrixjobs.app import App
from matrixjobs.matrix import bot as bot_module
from matrixjobs.matrix.bot import MatrixBot
from matrixjobs.models import Status, Trigger, TriggerKind

ROOM = "!ci:example.org"
BOT = "@bot:example.org"
PUSH = Trigger(TriggerKind.WEBHOOK, "site", event="push", ref="refs/heads/main",
               branch="main", sha="3f2c1ab9d0e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4", pusher="alice")
# Well under the fallback poll: only a wake-up can post within it.
FAST_S = 1.0


class RecordingSender:
    """Stands in for the homeserver: records when each message would have been sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, dict[str, Any]]] = []
        self.arrived = asyncio.Event()

    async def send(self, room_id: str, content: dict[str, Any], txn_id: str) -> str:
        self.sent.append((time.monotonic(), content))
        self.arrived.set()
        return f"$sent{len(self.sent)}"


def node(tmp_path, url, name, workers):
    matrix = {"homeserver": "http://127.0.0.1:9", "user_id": BOT, "rate_per_s": 0}
    return make_config(
        tmp_path / name, api={"enabled": False}, worker={"name": name},
        store={"backend": "postgresql", "url": url}, queue={"workers": workers},
        matrix=matrix,
        targets={"docs": python_target("import time; time.sleep(2); print('built')"),
                 "quick": python_target("print('built')")})


@pytest.fixture
async def two_nodes(tmp_path, pg_url) -> AsyncIterator[tuple[App, App]]:
    """Node A runs no jobs (so it hears of B's only through the store); B runs them."""
    a, b = App(node(tmp_path, pg_url, "a", 0)), App(node(tmp_path, pg_url, "b", 1))
    await a.start()
    await b.start()
    yield a, b
    await b.stop()
    await a.stop()


@pytest.fixture
async def posting_bot(two_nodes, monkeypatch) -> AsyncIterator[RecordingSender]:
    """Node A's bot past its login, in ROOM: it follows progress and posts triggered work
    (no homeserver: the sender records what it would send). Its fallback look at the store
    is a minute away: what it posts within FAST_S, a wake-up posted."""
    monkeypatch.setattr(bot_module, "UNSENT_EVERY_S", 60.0)
    a, _ = two_nodes
    assert a.config.matrix is not None
    bot = MatrixBot(a, a.config.matrix, a.config.progress.interval_ms)
    bot.client.rooms[ROOM] = MatrixRoom(ROOM, BOT)
    sender = RecordingSender()
    bot.scheduler.sender = sender
    # What start() and a login end with; no homeserver, so no login nor sync loop.
    bot._events = a.monitor.subscribe()
    bot.synced.set()
    bot._supervisor.keep("matrix-edits", bot.scheduler.run)
    bot._supervisor.keep("matrix-progress", bot._follow_progress)
    bot._supervisor.keep("matrix-triggered", bot._show_unsent)
    yield sender
    await bot.drop()


async def test_the_leaders_bot_posts_work_another_node_triggered_at_once(two_nodes,
                                                                       posting_bot):
    _, b = two_nodes
    queued = time.monotonic()
    job = await b.trigger(PUSH, target="docs", room=ROOM)
    await asyncio.wait_for(posting_bot.arrived.wait(), 10)
    took = posting_bot.sent[0][0] - queued
    print(f"posted {took:.3f} s after node B queued it")
    [(_, content)] = posting_bot.sent
    assert "🪝 push to main by alice (3f2c1ab)" in content["body"].splitlines()
    assert took < FAST_S, f"posted {took:.2f} s after node B queued {job.id}"


async def test_work_first_heard_of_at_its_end_is_posted_at_once(two_nodes, posting_bot,
                                                                 monkeypatch):
    """Node A hears of B's job only once it has ended (its feed fell behind, say): the
    message, final at once, still goes out then."""
    a, b = two_nodes
    assert a.remote is not None
    told, held = a.remote.changed, []
    monkeypatch.setattr(a.remote, "changed", held.append)
    job = await b.trigger(PUSH, target="quick", room=ROOM)
    assert (await final_state(b, job.id)).status is Status.COMPLETED
    assert held, "node B announced nothing"
    heard = time.monotonic()
    for ids in held:
        told(ids)
    await asyncio.wait_for(posting_bot.arrived.wait(), 10)
    took = posting_bot.sent[0][0] - heard
    print(f"posted {took:.3f} s after node A heard of it")
    [(_, content)] = posting_bot.sent
    assert content["body"].startswith("✅"), content["body"]
    assert took < FAST_S, f"posted {took:.2f} s after node A heard of {job.id}"

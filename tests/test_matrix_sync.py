"""The sync loop's own decisions, with the homeserver's answers stood in for: a limited
timeline (a gap, e.g. after an outage) is filled from /messages, oldest first, and the
debug log says so in one line each."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from helpers import make_config
from nio import RoomMessagesResponse, RoomMessageText

from matrixjobs.app import App
from matrixjobs.matrix.bot import MatrixBot

ROOM = "!gap:example.org"


def message(event_id: str) -> RoomMessageText:
    event = RoomMessageText.from_dict({
        "type": "m.room.message", "event_id": event_id, "sender": "@alice:example.org",
        "origin_server_ts": 1, "content": {"msgtype": "m.text", "body": "!jobs"}})
    assert isinstance(event, RoomMessageText)
    return event


async def test_a_sync_gap_is_filled_oldest_first_and_said_at_debug(tmp_path, monkeypatch,
                                                                     caplog):
    caplog.set_level(logging.DEBUG, logger="matrixjobs.matrix.bot")
    config = make_config(tmp_path, api={"enabled": False}, matrix={
        "homeserver": "http://127.0.0.1:9", "user_id": "@bot:example.org"})
    assert config.matrix is not None
    bot = MatrixBot(App(config), config.matrix, config.progress.interval_ms)
    bot._known_rooms.add(ROOM)
    asked = []

    async def room_messages(room_id, start, end, direction, limit):
        asked.append((room_id, start, end, limit))
        # Backwards from the gap's end: newest first.
        return RoomMessagesResponse(room_id, [message("$m3"), message("$m2"), message("$m1")],
                                    start, end)

    monkeypatch.setattr(bot.client, "room_messages", room_messages)
    timeline = SimpleNamespace(events=[message("$new")], limited=True, prev_batch="gap-end")
    try:
        events = await bot._new_events(ROOM, timeline, "last-sync")
    finally:
        await bot.client.close()
    assert [event.event_id for event in events] == ["$m1", "$m2", "$m3", "$new"]
    assert asked == [(ROOM, "gap-end", "last-sync", 200)]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG] == [
        f"matrix: sync gap in {ROOM} (a limited timeline of 1 events): fetching what it "
        "left out",
        f"matrix: caught up in {ROOM}: 3 missed events fetched (at most 200)"]

"""Schedules through every interface: GET /v1/schedules and pause/resume over HTTP, the
CLI (`matrixjobs schedules`), the room (`!schedules`, `!schedule pause NAME`) and MCP; the
same rules and the same audit records whichever is used."""

from __future__ import annotations

import json
from datetime import datetime

from helpers import make_config, python_target
from test_cli_client import run_cli
from test_rules_room import ALICE, BOB, close, open_room

from matrixjobs.api import ApiServer
from matrixjobs.audit import AuditQuery
from matrixjobs.mcp.backend import AppBackend

QUICK = python_target("print('built')")
TARGETS = {"docs": QUICK, "deploy": {**QUICK, "allowed_users": [BOB],
                                     "args_pattern": "[a-z]+"}}
SCHEDULES = {
    "nightly": {"cron": "30 2 * * *", "timezone": "Europe/Berlin", "target": "docs"},
    "ship": {"cron": "0 * * * *", "target": "deploy", "args": ["main"],
             "room": "#ci:example.org", "missed": "skip"},
}
TOKEN = "a-token-of-enough-length"


async def test_the_api_lists_pauses_and_resumes_schedules(api_service):
    app, client = await api_service(token=TOKEN, access={"allowed_users": [ALICE]},
                                     targets=TARGETS, schedules=SCHEDULES)
    listed = (await client.get("/v1/schedules")).json()["schedules"]
    assert [s["name"] for s in listed] == ["nightly", "ship"]
    nightly, ship = listed
    assert nightly["timezone"] == "Europe/Berlin" and nightly["paused"] is False
    assert datetime.fromisoformat(nightly["nextRun"]).strftime("%H:%M") in ("02:30", "03:00")
    assert nightly["nextRun"][-6:] in ("+01:00", "+02:00")  # Berlin's offset, not UTC's
    assert (nightly["lastJob"], nightly["lastStatus"], nightly["pausedBy"]) == (
        None, None, None)
    assert (ship["target"], ship["args"], ship["room"], ship["missed"]) == (
        "deploy", ["main"], "#ci:example.org", "skip")
    paused = await client.post("/v1/schedules/ship/pause")
    assert paused.status_code == 200
    assert (paused.json()["paused"], paused.json()["pausedBy"], paused.json()["nextRun"]) == (
        True, "admin", None)
    resumed = (await client.post("/v1/schedules/ship/resume")).json()
    assert resumed["paused"] is False and resumed["nextRun"] is not None
    missing = await client.post("/v1/schedules/shipp/pause")
    assert missing.status_code == 404 and "no schedule 'shipp'" in missing.text
    records = await app.audit(AuditQuery(user="admin"))
    assert [(r.action, r.via, r.target) for r in records
            if r.action.startswith("schedule")] == [
        ("schedule_paused", "api", "deploy"), ("schedule_resumed", "api", "deploy")]


async def test_the_body_less_posts_refuse_a_body_they_would_ignore(api_service):
    """A pause told {"paused": false} must not pause: pause, resume, cancel, approve and
    rerun take no body, and refuse one with fields as other endpoints refuse unknown
    fields. No body, or {}, is what every client sends."""
    _, client = await api_service(token=TOKEN, targets=TARGETS, schedules=SCHEDULES)
    told = await client.post("/v1/schedules/ship/pause", json={"paused": False})
    assert (told.status_code, told.json()["error"]["code"]) == (400, "bad_body")
    assert "paused: unknown field" in told.json()["error"]["message"]
    assert not (await client.get("/v1/schedules")).json()["schedules"][1]["paused"]
    garbled = await client.post("/v1/schedules/ship/resume", content=b"{")
    assert (garbled.status_code, garbled.json()["error"]["code"]) == (400, "bad_json")
    assert (await client.post("/v1/schedules/ship/pause", json={})).status_code == 200
    assert (await client.post("/v1/schedules/ship/resume")).status_code == 200
    for action in ("cancel", "approve", "rerun"):
        for kind in ("jobs/j999", "batches/b999"):
            answer = await client.post(f"/v1/{kind}/{action}", json={"reason": "x"})
            assert (answer.status_code, answer.json()["error"]["code"]) == (400, "bad_body")
            assert (await client.post(f"/v1/{kind}/{action}")).status_code == 404


async def test_the_cli_lists_as_json_and_lines_and_pauses_by_name(api_service):
    app, _ = await api_service(token=TOKEN, targets=TARGETS, schedules=SCHEDULES)
    [server] = [c for c in app.components if isinstance(c, ApiServer)]
    listed = await run_cli(server.url, "schedules", "--json", token=TOKEN)
    assert listed.code == 0, listed
    assert [s["name"] for s in json.loads(listed.out)["schedules"]] == ["nightly", "ship"]
    paused = await run_cli(server.url, "schedules", "pause", "nightly", token=TOKEN)
    assert paused.code == 0, paused
    assert paused.out.startswith("⏸️ nightly (30 2 * * *, Europe/Berlin) → docs: paused by "
                                 "admin; no run yet"), paused.out
    lines = await run_cli(server.url, "schedules", token=TOKEN)  # not a terminal: lines
    assert lines.out.splitlines()[1].startswith("⏰ ship (0 * * * *, UTC) → deploy main: next ")
    usage = await run_cli(server.url, "schedules", "resume", token=TOKEN)
    assert usage.code == 2 and "schedules resume needs a NAME" in usage.err
    unknown = await run_cli(server.url, "schedules", "resume", "nope", token=TOKEN)
    assert unknown.code == 1 and "no schedule 'nope'" in unknown.err
    [record] = await app.audit(AuditQuery(action="schedule_paused"))
    assert (record.actor, record.via) == ("admin", "cli")


async def test_the_room_lists_schedules_and_pauses_only_for_who_may_run_them(tmp_path):
    room = await open_room(tmp_path, access={"allowed_users": [ALICE, BOB]},
                           targets=TARGETS, schedules=SCHEDULES)
    try:
        [listed] = await room.say(ALICE, "!schedules")
        assert "⏰ nightly (30 2 * * *, Europe/Berlin) → docs: next " in listed, listed
        [refused] = await room.say(ALICE, "!schedule pause ship")
        assert refused == "⛔ you may not run deploy", refused
        [paused] = await room.say(BOB, "!schedule pause ship")
        assert paused == ("⏸️ ship is paused by @bob:example.org: it starts nothing until "
                          "!schedule resume ship"), paused
        [resumed] = await room.say(BOB, "!schedule resume ship")
        assert resumed.startswith("▶️ ship runs: next "), resumed
        [usage] = await room.say(BOB, "!schedule stop ship")
        assert "usage: !schedule pause NAME or !schedule resume NAME" in usage
        records = await room.app.audit(AuditQuery(target="deploy"))
        assert [(r.action, r.actor, r.via) for r in records] == [
            ("refused", ALICE, "room"), ("schedule_paused", BOB, "room"),
            ("schedule_resumed", BOB, "room")]
        assert records[1].room_id == "!room:example.org"
    finally:
        await close(room)


async def test_mcp_lists_and_pauses_schedules_as_the_operator(running_app, tmp_path):
    app = await running_app(make_config(tmp_path, targets=TARGETS, schedules=SCHEDULES))
    backend = AppBackend(app)
    assert [info.name for info in await backend.schedules()] == ["nightly", "ship"]
    paused = await backend.pause_schedule("ship", pause=True)
    assert paused.paused and paused.paused_by == "admin"
    assert not (await backend.pause_schedule("ship", pause=False)).paused

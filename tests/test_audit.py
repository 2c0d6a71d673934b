"""The audit log: every action recorded with who and from where, in a hash chain that
`verify` checks; an edited, deleted or added record is found on both backends."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
from conftest import on_backend
from helpers import final_state, make_config, python_target

from matrixjobs import audit as audit_log
from matrixjobs.app import App
from matrixjobs.audit import AuditAction, AuditQuery, Entry
from matrixjobs.errors import ForbiddenError
from matrixjobs.ops import audit_check
from matrixjobs.policy import ADMIN, Caller, Place, Via
from matrixjobs.store import sqlite as sqlite_store

ALICE, BOB = "@alice:example.org", "@bob:example.org"
ROOM = Place("!ops:example.org")
QUICK = python_target("print('done')")
SLOW = python_target("import time; time.sleep(30)")


def config(tmp_path: Path, url: str | None):
    return on_backend(make_config(
        tmp_path, access={"allowed_users": [ALICE, BOB]},
        targets={"quick": QUICK, "slow": SLOW, "held": {**QUICK, "approvals": 1},
                 "mods": {**QUICK, "rooms": [ROOM.room_id], "power_level": 50}}), url)


def actions(records: list[audit_log.Record]) -> list[tuple[str, str, str | None]]:
    return [(r.action, r.actor, r.subject) for r in records
            if r.action not in (AuditAction.SERVICE_STARTED, AuditAction.SERVICE_STOPPED)]


# -- the chain, pure ----------------------------------------------------------------------------


def chain(count: int) -> list[audit_log.Record]:
    records, prev = [], audit_log.GENESIS
    for seq in range(1, count + 1):
        record = audit_log.chained(Entry(AuditAction.STARTED, ALICE, "room", f"j{seq}"),
                                   seq, 1000.0 + seq, prev)
        records.append(record)
        prev = record.hash
    return records


def head(records: list[audit_log.Record]) -> tuple[int, str]:
    return records[-1].seq, records[-1].hash


def test_an_untouched_chain_verifies():
    records = chain(5)
    verdict = audit_log.verify(records, head(records))
    assert (verdict.ok, verdict.records, verdict.first, verdict.last) == (True, 5, 1, 5)
    assert audit_log.verify([], (0, audit_log.GENESIS)).ok


@pytest.mark.parametrize(("tamper", "problem"), [
    (lambda r: [*r[:2], replace(r[2], actor=BOB), *r[3:]], "record 3 was changed"),
    (lambda r: [*r[:2], *r[3:]], "records 3-3 are missing"),
    (lambda r: r[:-1], "the chain should end at record 5; it ends at 4"),
    (lambda r: r[1:], "records before 2 were removed without a pruned record saying so"),
    (lambda r: [*r[:2], replace(r[2], hash=r[3].hash), *r[3:]], "record 3 was changed"),
])
def test_an_edited_deleted_or_cut_record_is_found(tamper, problem):
    records = chain(5)
    verdict = audit_log.verify(tamper(records), head(records))
    assert not verdict.ok
    assert any(found.startswith(problem) for found in verdict.problems), verdict.problems


def test_a_record_rewritten_with_a_fresh_hash_breaks_the_next_link():
    records = chain(4)
    forged = audit_log.chained(Entry(AuditAction.STARTED, BOB, "api", "j2"), 2, 1002.0,
                               records[0].hash)
    verdict = audit_log.verify([records[0], forged, *records[2:]], head(records))
    assert verdict.problems == ["record 3 does not follow record 2 (its previous hash "
                                "differs)"]


# -- recorded by the service, on both backends -------------------------------------------------


async def test_actions_are_recorded_with_who_and_from_where(tmp_path, database_url,
                                                            running_app):
    app = await running_app(config(tmp_path, database_url))
    alice = Caller.in_room(ALICE, ROOM, "$command1")
    job = await app.submit("quick", caller=alice)
    await final_state(app, job.id)
    again = await app.rerun(job.id, Caller(ADMIN, Via.CLI))
    await final_state(app, again.id)
    slow = await app.submit("slow", caller=Caller(ADMIN, Via.API))
    await app.cancel(slow.id, Caller.in_room(BOB, ROOM, "$reaction"))
    with pytest.raises(ForbiddenError):
        await app.submit("mods", caller=Caller(ADMIN, Via.MCP))
    held = await app.submit("held", caller=alice)
    await app.approve(held.id, Caller.in_room(BOB, ROOM, "$approve"))
    records = await app.audit(AuditQuery(limit=100))
    assert actions(records) == [
        ("started", ALICE, job.id), ("rerun", ADMIN, again.id), ("started", ADMIN, slow.id),
        ("cancelled", BOB, slow.id), ("refused", ADMIN, None), ("started", ALICE, held.id),
        ("approved", BOB, held.id)]
    started = next(r for r in records if r.subject == job.id)
    assert (started.via, started.room_id, started.event_id, started.target) == (
        "room", ROOM.room_id, "$command1", "quick")
    assert json.loads(started.detail) == {"args": []}
    refused = next(r for r in records if r.action == "refused")
    assert (refused.via, refused.target, json.loads(refused.detail)) == ("mcp", "mods", {
        "action": "run", "rule": "rooms",
        "reason": "mods can only be started from a Matrix room"})
    assert json.loads(next(r for r in records if r.action == "rerun").detail) == {
        "of": job.id, "args": []}
    assert (await app.verify_audit()).ok


async def test_the_service_records_its_start_and_stop_with_a_hash_of_its_config(
        tmp_path, database_url):
    settings = config(tmp_path, database_url)
    async with App(settings) as app:
        pass
    async with App(settings) as app:
        records = await app.audit(AuditQuery())
        assert [r.action for r in records] == ["service_started", "service_stopped",
                                               "service_started"]
        details = [json.loads(r.detail) for r in records]
        assert len({d["config"] for d in details}) == 1
        assert details[0]["role"] == "run"
        assert (await app.verify_audit()).ok


async def test_an_edited_or_deleted_row_is_caught(tmp_path, database_url, running_app):
    settings = config(tmp_path, database_url)
    app = await running_app(settings)
    for _ in range(3):
        await app.submit("quick", caller=Caller.in_room(ALICE, ROOM))
    records = await app.audit(AuditQuery())
    victim = records[2]
    await edit(settings, database_url, "UPDATE audit SET actor = '@bob:example.org' "
               f"WHERE seq = {victim.seq}")
    verdict = await app.verify_audit()
    assert verdict.problems == [f"record {victim.seq} was changed (its hash differs)"]
    await edit(settings, database_url, f"DELETE FROM audit WHERE seq = {victim.seq}")
    assert (await app.verify_audit()).problems == [
        f"records {victim.seq}-{victim.seq} are missing"]


async def test_a_cut_off_tail_is_caught_and_stays_caught_after_a_restart(
        tmp_path, database_url):
    settings = config(tmp_path, database_url)
    async with App(settings) as app:
        for _ in range(3):
            await app.submit("quick", caller=Caller.in_room(ALICE, ROOM))
        records = await app.audit(AuditQuery())
    last, kept = records[-1].seq + 1, records[-3].seq  # the stop's record; before it
    await edit(settings, database_url, f"DELETE FROM audit WHERE seq > {kept}")
    assert audit_check.check(settings).problems == [
        f"the chain should end at record {last}; it ends at {kept}"]
    async with App(settings) as app:  # goes on after the cut, which stays in sight
        assert (await app.verify_audit()).problems == [f"records {kept + 1}-{last} are missing"]


def test_a_store_from_before_the_head_moved_keeps_its_cut_off_tail_caught(tmp_path):
    """The SQLite head was a row a trigger moved; migrated, a tail cut before still shows."""
    from matrixjobs.store.sqlite import MIGRATIONS, SqliteStore
    settings = config(tmp_path, None)
    path = settings.store.path
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path, isolation_level=None) as db:
        for step in MIGRATIONS[:-1]:
            db.executescript(step)
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) - 1}")
        for record in chain(4):
            db.execute(f"INSERT INTO audit ({audit_log.COLUMNS}) VALUES "
                       f"({', '.join('?' * 12)})", audit_log.values(record))
        db.execute("DELETE FROM audit WHERE seq = 4")
    cut = ["the chain should end at record 4; it ends at 3"]
    assert audit_check.check(settings).problems == cut  # read as it is, unmigrated

    async def check() -> None:
        store = SqliteStore(path)
        await store.open()
        try:
            records, head = await store.audit_chain()
            assert audit_log.verify(records, head).problems == cut
            await store.append_audit(Entry(AuditAction.STARTED, ALICE, "room"))
            records, head = await store.audit_chain()
            assert head[0] == 5
            assert audit_log.verify(records, head).problems == ["records 4-4 are missing"]
        finally:
            await store.close()
    asyncio.run(check())


async def test_a_record_that_cannot_be_written_takes_its_change_with_it(tmp_path):
    """On SQLite the record is written with the COMMIT: if it fails, nothing commits."""
    from matrixjobs.models import JobSpec
    from matrixjobs.store.sqlite import SqliteStore
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    spec = JobSpec(type="t", data={}, name="t", max_retries=0, timeout_s=5)
    started = Entry(AuditAction.STARTED, ALICE, "room")
    try:
        await store.add_jobs([spec], time.time(), audit=started)
        with sqlite3.connect(tmp_path / "jobs.db") as db:  # takes the next record's number
            db.execute(f"INSERT INTO audit ({audit_log.COLUMNS}) SELECT seq + 1, "
                       f"{audit_log.COLUMNS.split(', ', 1)[1]} FROM audit")
        with pytest.raises(sqlite3.IntegrityError):
            await store.add_jobs([spec], time.time(), audit=started)
        assert len(await store.list_jobs()) == 1
        [job] = await store.add_jobs([spec], time.time(), audit=started)  # the head read anew
        records, head = await store.audit_chain()
        assert [r.subject for r in records] == ["j1", "j1", job.id] and head[0] == 3
    finally:
        await store.close()


async def edit(settings, url: str | None, statement: str) -> None:
    """Change the store behind the service's back, as someone with its file would."""
    if url is None:
        with sqlite3.connect(settings.store.path) as db:
            db.execute(statement)
        return
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(statement)


async def test_retention_removes_old_records_from_the_start_and_verify_still_passes(
        tmp_path, database_url, running_app):
    app = await running_app(config(tmp_path, database_url))
    for _ in range(3):
        await app.submit("quick", caller=Caller.in_room(ALICE, ROOM))
    before = await app.audit(AuditQuery())
    await asyncio.sleep(0.05)
    cutoff = time.time()
    await app.submit("quick", caller=Caller.in_room(BOB, ROOM))
    removed = await app.store.prune_audit(cutoff)
    assert removed == len(before)
    after = await app.audit(AuditQuery())
    assert [r.action for r in after] == ["started", "pruned"]
    assert json.loads(after[-1].detail) == {"through": before[-1].seq, "hash": before[-1].hash,
                                            "removed": len(before)}
    verdict = await app.verify_audit()
    assert verdict.ok, verdict.problems
    assert verdict.first == before[-1].seq + 1


async def test_sqlite_finds_a_time_by_bisection_and_never_dates_a_record_back(
        store, monkeypatch):
    """SQLite keeps no index on the records' time (a page less for every record): `since`
    and retention bisect the chain, which holds because no record is dated before the one
    it follows, even when the clock is set back."""
    times = iter([*(100.0 + i for i in range(40)), 50.0, *(141.0 + i for i in range(20))])
    monkeypatch.setattr(sqlite_store, "time",
                        SimpleNamespace(time=lambda: next(times), monotonic=time.monotonic))
    for number in range(60):
        await store.append_audit(Entry(AuditAction.STARTED, ALICE, "room", f"j{number}"))
    records = await store.audit_records(AuditQuery(limit=100))
    assert [r.at for r in records[39:42]] == [139.0, 139.0, 141.0]  # the step back
    for since in (0.0, 100.0, 120.5, 139.0, 140.0, 141.0, 159.0, 159.5, 1e12):
        found = await store.audit_records(AuditQuery(since=since, limit=100))
        assert found == [r for r in records if r.at >= since], since
    both = await store.audit_records(AuditQuery(since=110.0, after=30, limit=100))
    assert [r.seq for r in both] == list(range(31, 61))
    assert await store.prune_audit(125.0) == 25
    kept = await store.audit_records(AuditQuery(limit=100))
    assert [r.seq for r in kept] == [*range(26, 61), 61]  # then the pruned record
    records, head = await store.audit_chain()
    assert audit_log.verify(records, head).ok


# -- the API and the CLI ----------------------------------------------------------------------


async def test_the_api_lists_filters_and_verifies(api_service):
    app, client = await api_service(token="audit-token", targets={"quick": QUICK},
                                    access={"allowed_users": [ALICE]})
    await client.post("/v1/jobs", json={"target": "quick"})
    await app.submit("quick", caller=Caller.in_room(ALICE, ROOM))
    listed = (await client.get("/v1/audit", params={"action": "started"})).json()["records"]
    assert [(r["actor"], r["via"], r["target"]) for r in listed] == [
        ("admin", "api", "quick"), (ALICE, "room", "quick")]
    assert {"seq", "at", "prevHash", "hash", "detail", "roomId", "eventId"} <= set(listed[0])
    mine = (await client.get("/v1/audit", params={"user": ALICE})).json()["records"]
    assert [r["seq"] for r in mine] == [listed[1]["seq"]]
    later = (await client.get("/v1/audit", params={"after": listed[0]["seq"],
                                                   "target": "quick"})).json()["records"]
    assert [r["seq"] for r in later] == [listed[1]["seq"]]
    verified = (await client.get("/v1/audit/verify")).json()
    assert verified["ok"] and verified["problems"] == []
    for params, message in (({"action": "deleted"}, "action must be among"),
                            ({"since": "yesterday"}, "since must be a time"),
                            ({"after": "-1"}, "after must be"),
                            # past SQLite's integers (a 500 once), and not ASCII digits
                            ({"after": "277012961294741898943426858158391296"},
                             "after must be"), ({"after": "١٢"}, "after must be"),
                            ({"limit": "0"}, "limit"), ({"limit": "9" * 5000}, "limit"),
                            ({"seq": "1"}, "seq")):
        answer = await client.get("/v1/audit", params=params)
        assert answer.status_code == 400, params
        assert message in answer.json()["error"]["message"]
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert (await client.request(method, "/v1/audit")).status_code == 405


def test_audit_verify_reads_a_stopped_stores_chain_and_finds_an_edit(tmp_path):
    settings = config(tmp_path, None)

    async def fill() -> None:
        async with App(settings) as app:
            await app.submit("quick", caller=Caller.in_room(ALICE, ROOM))
    asyncio.run(fill())
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'[store]\npath = "{settings.store.path}"\n')

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "matrixjobs", "audit", "verify",
                               "--config", str(config_file)], capture_output=True, text=True,
                              timeout=60)
    done = verify()
    assert (done.returncode, done.stdout) == (0, "audit log: ok, 3 records (1-3)\n")
    with sqlite3.connect(settings.store.path) as db:
        db.execute("UPDATE audit SET detail = '{\"args\":[\"--force\"]}' WHERE seq = 2")
    done = verify()
    assert done.returncode == 1
    assert done.stdout == ("audit log: 1 problems in 3 records (1-3):\n"
                           "  record 2 was changed (its hash differs)\n")

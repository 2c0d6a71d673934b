"""Following the audit log, as an operator does on day one: `matrixjobs audit --follow`
(and a script asking `GET /v1/audit?after=SEQ` again and again) must see every record,
however many came between two asks."""

from __future__ import annotations

import argparse
import asyncio
import json

from conftest import on_backend
from helpers import make_config, python_target

from matrixjobs.api.client import ApiClient
from matrixjobs.api.server import ApiServer
from matrixjobs.audit import AuditAction, AuditQuery, Entry
from matrixjobs.console.commands import cmd_audit
from matrixjobs.console.display import Mode

ALICE = "@alice:example.org"
QUICK = python_target("print('done')")


async def test_asking_after_a_record_pages_forward_and_misses_none(tmp_path, database_url,
                                                                  running_app):
    app = await running_app(on_backend(make_config(tmp_path, targets={"quick": QUICK}),
                                       database_url))
    for number in range(10):
        await app.store.append_audit(Entry(AuditAction.STARTED, ALICE, "room", f"j{number}"))
    everything = [r.seq for r in await app.audit(AuditQuery(limit=1000))]
    seen: list[int] = []
    after = 0
    while page := await app.audit(AuditQuery(after=after, limit=3)):
        seen += [r.seq for r in page]
        after = page[-1].seq
    assert seen == everything
    # Without `after`: the newest `limit`, oldest first, as before.
    assert [r.seq for r in await app.audit(AuditQuery(limit=3))] == everything[-3:]


async def test_audit_follow_prints_every_record_of_a_burst_larger_than_its_limit(
        api_service, capsys):
    app, _client = await api_service()
    [server] = [c for c in app.components if isinstance(c, ApiServer)]
    args = argparse.Namespace(what=None, user=None, action=None, target=None, since=None,
                              limit=2, follow=True, poll=0.05)
    async with ApiClient(server.url) as api:
        follower = asyncio.create_task(cmd_audit(api, args, Mode.JSON))
        await asyncio.sleep(0.3)  # it printed the newest records and waits for more
        for number in range(7):  # more than --limit between two asks
            await app.store.append_audit(Entry(AuditAction.STARTED, ALICE, "room",
                                               f"j{number}"))
        await asyncio.sleep(0.5)
        follower.cancel()
    printed = [json.loads(line)["subject"] for line in capsys.readouterr().out.splitlines()]
    assert printed[-7:] == [f"j{number}" for number in range(7)]

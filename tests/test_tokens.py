"""Personal API tokens: bound to a Matrix user, stored as a hash, acting with that user's
rules through the API, the CLI and the dashboard; the service token stays admin."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import subprocess
import sys

import pytest
from conftest import on_backend
from helpers import make_config, python_target
from service_process import child_env

from matrixjobs.audit import AuditQuery
from matrixjobs.errors import ForbiddenError, NotFoundError, TokenExistsError
from matrixjobs.policy import ADMIN, Caller, Place, Via

ALICE, BOB, EVE = "@alice:example.org", "@bob:example.org", "@eve:example.org"
QUICK = python_target("print('ok')")
TOKEN = "tokens-service-token"
TARGETS = {"quick": QUICK, "bobs": {**QUICK, "allowed_users": [BOB]},
           "deploy": {**QUICK, "rooms": ["!ops:example.org"]},
           "held": {**QUICK, "approvals": 1}}
ADMIN_API = Caller(ADMIN, Via.API)


async def test_issue_list_revoke_and_only_a_hash_is_kept(tmp_path, database_url, running_app):
    app = await running_app(on_backend(make_config(
        tmp_path, access={"allowed_users": [ALICE]}, targets=TARGETS), database_url))
    token = await app.issue_token(ALICE, "laptop", ADMIN_API)
    assert token.startswith("mjp_") and len(token) > 40
    assert await app.token_owner(token) == ALICE
    assert [(t.user, t.name) for t in await app.tokens(ADMIN_API)] == [(ALICE, "laptop")]
    with pytest.raises(TokenExistsError, match="already has a token named laptop"):
        await app.issue_token(ALICE, "laptop", Caller(ALICE, Via.ROOM, Place("!dm:x")))
    # A person manages their own only; a stranger none.
    with pytest.raises(ForbiddenError, match="only your own tokens"):
        await app.revoke_token(ALICE, "laptop", Caller(BOB, Via.API))
    with pytest.raises(ForbiddenError):
        await app.issue_token(EVE, "mine", Caller(EVE, Via.ROOM, Place("!dm:x")))
    for name in ("", "a b", "x" * 41, "semi;colon"):
        with pytest.raises(Exception, match="a token's name"):
            await app.issue_token(ALICE, name, ADMIN_API)
    if database_url is None:
        with sqlite3.connect(app.config.store.path) as db:
            [(digest,)] = db.execute("SELECT digest FROM tokens").fetchall()
        assert digest == hashlib.sha256(token.encode()).hexdigest()
    await app.revoke_token(ALICE, "laptop", Caller(ALICE, Via.API))
    assert await app.token_owner(token) is None
    with pytest.raises(NotFoundError, match="has no token named laptop"):
        await app.revoke_token(ALICE, "laptop", ADMIN_API)
    records = [(r.action, r.actor) for r in await app.audit(AuditQuery())
               if r.action.startswith("token")]
    assert records == [("token_issued", ADMIN), ("token_revoked", ALICE)]


async def test_a_personal_token_acts_as_its_user_with_their_rules(api_service):
    app, admin = await api_service(token=TOKEN, targets=TARGETS,
                                   access={"allowed_users": [ALICE, BOB]})
    alices = await app.issue_token(ALICE, "ci", ADMIN_API)
    bobs = await app.issue_token(BOB, "ci", ADMIN_API)
    as_alice = {"Authorization": f"Bearer {alices}"}
    who = await admin.get("/v1/whoami", headers=as_alice)
    assert who.json() == {"user": ALICE, "admin": False}
    assert (await admin.get("/v1/whoami")).json() == {"user": ADMIN, "admin": True}
    started = await admin.post("/v1/jobs", json={"target": "quick"}, headers=as_alice)
    assert started.status_code == 201 and started.json()["requester"] == ALICE
    refused = await admin.post("/v1/jobs", json={"target": "bobs"}, headers=as_alice)
    assert (refused.status_code, refused.json()["error"]["message"]) == (
        403, "you may not run bobs")
    room_only = await admin.post("/v1/jobs", json={"target": "deploy"}, headers=as_alice)
    assert room_only.json()["error"]["message"] == "deploy can only be started from a Matrix room"
    # Approvals count as theirs: Alice's own never, Bob's does.
    held = (await admin.post("/v1/jobs", json={"target": "held"}, headers=as_alice)).json()
    own = await admin.post(f"/v1/jobs/{held['id']}/approve", headers=as_alice)
    assert own.status_code == 403
    approved = await admin.post(f"/v1/jobs/{held['id']}/approve",
                                headers={"Authorization": f"Bearer {bobs}"})
    assert approved.json()["approval"]["approvedBy"] == [BOB]
    # Their audit only; their tokens only; MCP over HTTP takes the service token.
    mine = (await admin.get("/v1/audit", headers=as_alice)).json()["records"]
    assert mine and {r["actor"] for r in mine} == {ALICE}
    listed = (await admin.get("/v1/tokens", headers=as_alice)).json()["tokens"]
    assert [(t["user"], t["name"]) for t in listed] == [(ALICE, "ci")]
    assert len((await admin.get("/v1/tokens")).json()["tokens"]) == 2
    mcp = await admin.post("/mcp", json={}, headers=as_alice)
    assert (mcp.status_code, mcp.json()["error"]["code"]) == (403, "forbidden")
    # Revoked: it stops working at once.
    assert (await admin.delete("/v1/tokens/ci", params={"user": ALICE})).status_code == 200
    gone = await admin.get("/v1/whoami", headers=as_alice)
    assert gone.status_code == 401


async def test_the_dashboard_login_takes_a_personal_token_and_says_who(api_service):
    app, admin = await api_service(token=TOKEN, targets=TARGETS,
                                   access={"allowed_users": [ALICE]})
    token = await app.issue_token(ALICE, "browser", ADMIN_API)
    base = str(admin.base_url)
    import httpx2

    async with httpx2.AsyncClient(base_url=base) as browser:
        logged = await browser.post("/login", data={"token": token},
                                    headers={"Origin": base.rstrip("/")})
        assert logged.status_code == 303
        who = await browser.get("/v1/whoami", headers={"Referer": f"{base}/"})
        assert who.json() == {"user": ALICE, "admin": False}
        await app.revoke_token(ALICE, "browser", ADMIN_API)
        assert (await browser.get("/v1/whoami")).status_code == 401


async def test_the_cli_creates_lists_and_revokes(api_service):
    app, admin = await api_service(token=TOKEN, targets=TARGETS,
                                   access={"allowed_users": [ALICE]})
    url = str(admin.base_url).rstrip("/")

    async def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "matrixjobs", "tokens", *args, "--api", url],
            capture_output=True, text=True, timeout=60,
            env={**child_env(), "MATRIXJOBS_API_TOKEN": TOKEN})
    made = await cli("create", "--user", ALICE, "--name", "laptop")
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith(f"token laptop for {ALICE} (shown once; keep it "
                                  "secret):\nmjp_")
    assert await app.token_owner(made.stdout.splitlines()[1]) == ALICE
    assert (await cli("list")).stdout.startswith(f"{ALICE} laptop (made ")
    revoked = await cli("revoke", "laptop", "--user", ALICE)
    assert revoked.stdout == f"revoked {ALICE}'s token laptop\n"
    again = await cli("revoke", "laptop", "--user", ALICE)
    assert again.returncode == 1 and "has no token named laptop" in again.stderr

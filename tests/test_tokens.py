"""Personal API tokens: bound to a Matrix user, stored as a hash, acting with that user's
rules through the API, the CLI, the dashboard and MCP over HTTP; the service token stays
admin."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import subprocess
import sys

import httpx2
import pytest
from conftest import on_backend
from helpers import make_config, python_target
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
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
    # Their audit only; their tokens only.
    mine = (await admin.get("/v1/audit", headers=as_alice)).json()["records"]
    assert mine and {r["actor"] for r in mine} == {ALICE}
    listed = (await admin.get("/v1/tokens", headers=as_alice)).json()["tokens"]
    assert [(t["user"], t["name"]) for t in listed] == [(ALICE, "ci")]
    assert len((await admin.get("/v1/tokens")).json()["tokens"]) == 2
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


def mcp_as(admin: httpx2.AsyncClient, token: str, mode: str) -> Client:
    """The SDK's own client on the service's /mcp, sending `token`."""
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=20.0)
    url = admin.base_url.join("/mcp")
    return Client(streamable_http_client(url, http_client=http), mode=mode)


async def tool(client: Client, name: str, **arguments: object) -> dict[str, object]:
    result = await client.call_tool(name, arguments)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


async def tool_error(client: Client, name: str, **arguments: object) -> str:
    """The reason a tool call failed, without the SDK's "Error executing tool …: "."""
    result = await client.call_tool(name, arguments)
    assert result.is_error, result.structured_content
    text = " ".join(getattr(part, "text", "") for part in result.content)
    return text.removeprefix(f"Error executing tool {name}: ")


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_mcp_over_http_acts_as_the_personal_tokens_user(api_service, mode):
    app, admin = await api_service(token=TOKEN, targets=TARGETS,
                                   access={"allowed_users": [ALICE, BOB]})
    alices = await app.issue_token(ALICE, "agent", ADMIN_API)
    bobs = await app.issue_token(BOB, "agent", ADMIN_API)
    async with mcp_as(admin, alices, mode) as alice, mcp_as(admin, bobs, mode) as bob, \
            mcp_as(admin, TOKEN, mode) as service:
        started = await tool(alice, "submit_build", target="quick")
        assert started["requester"] == ALICE
        assert (await tool(service, "submit_build", target="quick"))["requester"] == "mcp"
        # A rule that refuses Alice refuses her here as on the API, in the same words.
        on_api = await admin.post("/v1/jobs", json={"target": "bobs"},
                                  headers={"Authorization": f"Bearer {alices}"})
        reason = on_api.json()["error"]["message"]
        assert reason == "you may not run bobs"
        assert await tool_error(alice, "submit_build", target="bobs") == reason
        # Held work: her own approval never counts; Bob's does, as his.
        held = await tool(alice, "submit_build", target="held")
        assert await tool_error(alice, "approve", id=held["id"]) == (
            "you asked for it: your own approval does not count")
        approved = await tool(bob, "approve", id=held["id"])
        assert approved["approval"]["approvedBy"] == [BOB]
    records = [(r.action, r.actor, r.via, r.target) for r in await app.audit(AuditQuery())
               if r.via == "mcp"]
    assert records == [("started", ALICE, "mcp", "quick"), ("started", ADMIN, "mcp", "quick"),
                       ("refused", ALICE, "mcp", "bobs"), ("started", ALICE, "mcp", "held"),
                       ("refused", ALICE, "mcp", "held"), ("approved", BOB, "mcp", "held")]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_mcp_refuses_a_revoked_token_at_the_next_request_and_a_wrong_one(
        api_service, mode):
    app, admin = await api_service(token=TOKEN, targets=TARGETS,
                                   access={"allowed_users": [ALICE]})
    token = await app.issue_token(ALICE, "agent", ADMIN_API)
    async with mcp_as(admin, token, mode) as alice:
        assert (await tool(alice, "submit_build", target="quick"))["requester"] == ALICE
        await app.revoke_token(ALICE, "agent", ADMIN_API)
        # The same session, the next call: the token is read again and is gone.
        with pytest.raises(MCPError):
            await alice.call_tool("submit_build", {"target": "quick"})
    assert [job.requester for job in await app.jobs(None, 10)] == [ALICE]
    for wrong in (token, "mjp_" + "x" * 43):
        answer = await admin.post("/mcp", json={}, headers={"Authorization": f"Bearer {wrong}"})
        assert (answer.status_code, answer.json()["error"]["code"]) == (401, "unauthorized")


async def test_mcp_over_stdio_acts_as_whoever_its_token_names(api_service):
    # `matrixjobs mcp` goes through the API, so a personal token there is its user too.
    app, admin = await api_service(token=TOKEN, targets=TARGETS,
                                   access={"allowed_users": [ALICE, BOB]})
    token = await app.issue_token(ALICE, "agent", ADMIN_API)
    stdio = StdioServerParameters(
        command=sys.executable, args=["-m", "matrixjobs", "mcp", "--api", str(admin.base_url)],
        env={**child_env(), "MATRIXJOBS_API_TOKEN": token})
    async with Client(stdio) as alice:
        assert (await tool(alice, "submit_build", target="quick"))["requester"] == ALICE
        assert await tool_error(alice, "submit_build", target="bobs") == "you may not run bobs"
    [refused] = await app.audit(AuditQuery(action="refused"))
    assert (refused.actor, refused.via) == (ALICE, "mcp")


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

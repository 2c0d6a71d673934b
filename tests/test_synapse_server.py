"""The real-Synapse harness itself: start, register, talk through matrix-nio, restart."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import nio
import pytest
from synapse_fixtures import make_synapse_fixture

from matrixjobs.demo.synapse import SynapseError, SynapseHTTPError, SynapseServer

hs = make_synapse_fixture(scope="module")


async def _token_client(hs: SynapseServer, user: dict) -> nio.AsyncClient:
    client = nio.AsyncClient(hs.base_url, user["user_id"], device_id=user["device_id"])
    client.access_token = user["access_token"]
    client.user_id = user["user_id"]
    return client


async def _wait_for_message(
    client: nio.AsyncClient, room_id: str, body: str, timeout: float = 15.0
) -> nio.RoomMessageText:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = await client.sync(timeout=2000)
        assert isinstance(resp, nio.SyncResponse), resp
        room = resp.rooms.join.get(room_id)
        for event in room.timeline.events if room else []:
            if isinstance(event, nio.RoomMessageText) and event.body == body:
                return event
    raise AssertionError(f"{body!r} did not arrive in {room_id} within {timeout}s")


async def test_two_users_talk_through_synapse(hs: SynapseServer):
    alice = hs.register("alice", "alice-password")
    bob = hs.register("bob")
    assert alice["user_id"] == f"@alice:{hs.server_name}"
    assert alice["access_token"] and alice["device_id"] and bob["password"]

    a = nio.AsyncClient(hs.base_url, alice["user_id"])
    b = await _token_client(hs, bob)
    try:
        login = await a.login("alice-password", device_name="harness-test")
        assert isinstance(login, nio.LoginResponse), login

        first = await a.sync(timeout=0)
        assert isinstance(first, nio.SyncResponse), first

        created = await a.room_create(name="harness")
        assert isinstance(created, nio.RoomCreateResponse), created
        room_id = created.room_id
        invited = await a.room_invite(room_id, bob["user_id"])
        assert isinstance(invited, nio.RoomInviteResponse), invited

        joined = await b.join(room_id)
        assert isinstance(joined, nio.JoinResponse), joined

        sent = await b.room_send(
            room_id, "m.room.message", {"msgtype": "m.text", "body": "hello from bob"}
        )
        assert isinstance(sent, nio.RoomSendResponse), sent

        event = await _wait_for_message(a, room_id, "hello from bob")
        assert event.sender == bob["user_id"]
        assert event.event_id == sent.event_id
    finally:
        await a.close()
        await b.close()


def test_admin_override_ratelimit(hs: SynapseServer):
    admin = hs.register("admin", admin=True)
    bot = hs.register("bot")
    assert hs.get_rate_limit_override(bot["user_id"], admin["access_token"]) == {}
    hs.exempt_from_rate_limit(bot["user_id"], admin["access_token"])
    assert hs.get_rate_limit_override(bot["user_id"], admin["access_token"]) == {
        "messages_per_second": 0,
        "burst_count": 0,
    }
    with pytest.raises(SynapseHTTPError) as err:  # non-admins may not do it
        hs.exempt_from_rate_limit(bot["user_id"], bot["access_token"])
    assert err.value.status == 403


async def test_restart_keeps_port_and_db(hs: SynapseServer):
    carol = hs.register("carol", "carol-password")
    port, pid = hs.port, hs.pid

    hs.stop()
    assert not hs.running
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(hs.base_url + "/_matrix/client/versions", timeout=2)

    hs.start()
    assert hs.running and hs.port == port and hs.pid != pid

    client = nio.AsyncClient(hs.base_url, carol["user_id"])
    try:
        login = await client.login("carol-password")
        assert isinstance(login, nio.LoginResponse), login
        whoami = await client.whoami()
        assert isinstance(whoami, nio.WhoamiResponse) and whoami.user_id == carol["user_id"]
    finally:
        await client.close()

    # Tokens issued before the restart still work (same DB).
    me = hs.request("GET", "/_matrix/client/v3/account/whoami", token=carol["access_token"])
    assert me["user_id"] == carol["user_id"]


def test_restart_method(hs: SynapseServer):
    hs.restart()
    assert hs.running
    # Registering right after a restart works: the server is ready when start() returns.
    assert hs.register("dave")["user_id"] == f"@dave:{hs.server_name}"


def test_startup_failure_reports_log_tail(tmp_path):
    bad = SynapseServer(base_dir=tmp_path, extra_config={"database": {"name": "nosuchdb"}})
    with pytest.raises(SynapseError) as err:
        bad.start()
    assert not bad.running
    assert "nosuchdb" in str(err.value)


def test_default_rc_message_applies_when_rate_limits_on():
    with SynapseServer(rate_limits=True) as limited:
        creator = limited.register("creator")
        limited.exempt_from_rate_limit(creator["user_id"])  # room setup eats rc_message too
        talker, bot = limited.register("talker"), limited.register("bot")
        room = limited.request(
            "POST",
            "/_matrix/client/v3/createRoom",
            {"invite": [talker["user_id"], bot["user_id"]]},
            token=creator["access_token"],
        )["room_id"]
        for user in (talker, bot):
            limited.request(
                "POST", f"/_matrix/client/v3/join/{room}", {}, token=user["access_token"]
            )

        def burst(user, n):
            for i in range(n):
                try:
                    limited.request(
                        "PUT",
                        f"/_matrix/client/v3/rooms/{room}/send/m.room.message/{i}",
                        {"msgtype": "m.text", "body": str(i)},
                        token=user["access_token"],
                    )
                except SynapseHTTPError as err:
                    assert err.status == 429 and err.json()["errcode"] == "M_LIMIT_EXCEEDED"
                    return i
            return n

        # Synapse's default burst_count is 10 and the join took one token; 0.2/s refills one
        # more only if the burst is slow, hence the range.
        assert 9 <= burst(talker, 15) <= 10
        limited.exempt_from_rate_limit(bot["user_id"])
        assert burst(bot, 25) == 25

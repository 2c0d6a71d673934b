"""The dashboard's server side without a browser: page, files, login, session, SSE stream."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
from dashboard_service import TOKEN, running, sse_messages

from matrixjobs.api import dashboard, feed
from matrixjobs.api.routes import matrix_to
from matrixjobs.api.session import COOKIE, LoginThrottle, session_value
from matrixjobs.config import MatrixConfig
from matrixjobs.models import ProgressMessage
from matrixjobs.progress import wording
from matrixjobs.progress.events import JobProgressEvent


async def wait_for(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def logged_in(svc) -> str:
    """The session cookie's value, got through the login form."""
    async with svc.client() as client:
        response = await client.post("/login", data={"token": TOKEN})
    assert response.status_code == 303, response.text
    return response.cookies[COOKIE]


# -- the page and its files ----------------------------------------------------------------------


async def test_page_and_static_files_have_types_security_headers_and_revalidate(tmp_path):
    async with running(tmp_path) as svc, svc.client() as client:
        page = await client.get("/")
        script = await client.get("/static/dashboard.js")
        style = await client.get("/static/dashboard.css")
        again = await client.get("/static/dashboard.js",
                                 headers={"If-None-Match": script.headers["etag"]})
        missing = await client.get("/static/nothing.js")
        template = await client.get("/static/login.html")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<script src=\"/static/dashboard.js\"" in page.text and "<script>" not in page.text
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert style.headers["content-type"] == "text/css; charset=utf-8"
    assert script.headers["cache-control"] == "no-cache"
    assert again.status_code == 304 and again.content == b""
    assert missing.status_code == 404
    assert template.status_code == 404  # the form's template is served as /login only


def test_dashboard_never_builds_html_from_data():
    """Job names, messages and requesters are user input: text nodes only."""
    source = (Path(feed.__file__).parent / "static" / "dashboard.js").read_text(encoding="utf-8")
    for risky in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert risky not in source


# -- login and session ---------------------------------------------------------------------------


async def test_wrong_token_gets_the_login_form_again_and_no_data(tmp_path):
    async with running(tmp_path, api={"token": TOKEN}) as svc:
        job_id = await svc.submit("quick")
        async with svc.client() as client:
            page = await client.get("/")
            form = await client.get("/login")
            wrong = await client.post("/login", data={"token": "not-the-token"})
            stream = await client.get("/v1/events")
    assert page.status_code == 303 and page.headers["location"] == "/login"
    assert form.status_code == 200 and '<form method="post" action="/login">' in form.text
    assert wrong.status_code == 401
    assert '<form method="post" action="/login">' in wrong.text and "Wrong token." in wrong.text
    assert COOKIE not in wrong.headers.get("set-cookie", "")
    assert job_id not in wrong.text and "quick" not in wrong.text
    assert stream.status_code == 401


async def test_right_token_sets_an_httponly_strict_cookie_that_is_not_the_token(tmp_path):
    async with running(tmp_path, api={"token": TOKEN}) as svc, svc.client() as client:
        response = await client.post("/login", data={"token": TOKEN})
        cookie = response.headers["set-cookie"]
        jobs = await client.get("/v1/jobs")  # the client keeps the cookie it was given
        page = await client.get("/")
    assert response.status_code == 303 and response.headers["location"] == "/"
    assert TOKEN not in cookie
    assert f"{COOKIE}={session_value(TOKEN)}" in cookie
    for flag in ("HttpOnly", "SameSite=Strict", "Path=/"):
        assert flag in cookie
    assert "Secure" not in cookie  # plain http on loopback
    assert jobs.status_code == 200 and page.status_code == 200


async def test_login_from_an_https_page_behind_a_proxy_gets_a_secure_cookie(tmp_path):
    async with running(tmp_path, api={"token": TOKEN}) as svc, svc.client() as client:
        host = svc.url.partition("://")[2]
        response = await client.post("/login", data={"token": TOKEN},
                                     headers={"Origin": f"https://{host}"})
    assert response.status_code == 303
    assert "; Secure" in response.headers["set-cookie"]


async def test_a_session_from_an_old_token_is_refused(tmp_path):
    async with running(tmp_path, api={"token": "the-new-token"}) as svc, \
            svc.client(cookies={COOKIE: session_value(TOKEN)}) as client:
        old = await client.get("/v1/jobs")
        page = await client.get("/")
    assert old.status_code == 401
    assert page.status_code == 303


async def test_the_session_cookie_from_another_origin_is_refused(tmp_path):
    async with running(tmp_path, api={"token": TOKEN}) as svc:
        job_id = await svc.submit("slow")
        cookie = await logged_in(svc)
        own = svc.url
        async with svc.client(cookies={COOKIE: cookie}) as client:
            foreign_get = await client.get("/v1/jobs", headers={"Origin": "https://evil.example"})
            foreign_cancel = await client.post(f"/v1/jobs/{job_id}/cancel",
                                               headers={"Origin": "https://evil.example"})
            foreign_referer = await client.post(
                f"/v1/jobs/{job_id}/cancel", headers={"Referer": "https://evil.example/x"})
            unnamed_post = await client.post(f"/v1/jobs/{job_id}/cancel")
            assert (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "processing"
            own_cancel = await client.post(f"/v1/jobs/{job_id}/cancel", headers={"Origin": own})
    for refused in (foreign_get, foreign_cancel, foreign_referer, unnamed_post):
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "forbidden"
    assert own_cancel.status_code == 200 and own_cancel.json()["status"] == "cancelled"


async def test_login_posted_by_another_site_is_refused(tmp_path):
    async with running(tmp_path, api={"token": TOKEN}) as svc, svc.client() as client:
        response = await client.post("/login", data={"token": TOKEN},
                                     headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    assert COOKIE not in response.headers.get("set-cookie", "")


async def test_wrong_tokens_are_throttled_per_address_but_the_right_one_always_gets_in(
        tmp_path, caplog):
    async with running(tmp_path, api={"token": TOKEN}) as svc, svc.client() as client:
        for _ in range(LoginThrottle().attempts):
            assert (await client.post("/login", data={"token": "guess"})).status_code == 401
        slowed = await client.post("/login", data={"token": "guess"})
        assert slowed.status_code == 429 and "Too many wrong tokens" in slowed.text
        assert COOKIE not in slowed.headers.get("set-cookie", "")
        # Wrong bearer tokens count against the same address, and get told when to retry.
        bearer = await client.get("/v1/jobs", headers={"Authorization": "Bearer guess"})
        assert bearer.status_code == 429 and int(bearer.headers["retry-after"]) >= 1
        assert bearer.json()["error"]["code"] == "too_many_requests"
        # A stranger's wrong tokens never lock out whoever holds the right one.
        right = await client.post("/login", data={"token": TOKEN})
        assert right.status_code == 303 and COOKIE in right.headers["set-cookie"]
        api = await client.get("/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
        assert api.status_code == 200
    assert "more than 5 wrong tokens from 127.0.0.1" in caplog.text


def test_throttle_forgets_failures_after_its_window():
    throttle = LoginThrottle(attempts=2, window_s=10.0)
    assert throttle.failed("10.0.0.1", now=100.0) == 0.0
    assert throttle.failed("10.0.0.1", now=101.0) == 0.0
    assert throttle.failed("10.0.0.1", now=102.0) == pytest.approx(8.0)
    assert throttle.failed("10.0.0.2", now=102.0) == 0.0
    assert throttle.failed("10.0.0.1", now=112.5) == 0.0  # the old ones aged out


def test_throttle_table_stays_bounded_under_a_flood_of_addresses():
    throttle = LoginThrottle(attempts=2, window_s=10.0, max_addresses=100)
    for number in range(1000):
        throttle.failed(f"10.0.{number // 256}.{number % 256}", now=1.0)
    assert len(throttle._failures) <= 100


async def test_logout_clears_the_cookie(tmp_path):
    async with running(tmp_path, api={"token": TOKEN}) as svc:
        cookie = await logged_in(svc)
        async with svc.client(cookies={COOKIE: cookie}) as client:
            response = await client.post("/logout", headers={"Origin": svc.url})
    assert response.status_code == 303 and response.headers["location"] == "/login"
    assert "Max-Age=0" in response.headers["set-cookie"]


async def test_without_a_token_login_leads_to_the_page(tmp_path):
    async with running(tmp_path) as svc, svc.client() as client:
        response = await client.get("/login")
        foreign = await client.get("/", headers={"Host": "evil.example"})
    assert response.status_code == 303 and response.headers["location"] == "/"
    assert foreign.status_code == 403  # the Host/Origin guard covers the page too


# -- API additions -------------------------------------------------------------------------------


async def test_jobs_of_one_batch(tmp_path):
    async with running(tmp_path) as svc, svc.client() as client:
        other = await svc.submit("quick", token=None)
        batch = (await client.post("/v1/batches", json={"targets": ["quick", "quick"]})).json()
        listed = await client.get("/v1/jobs", params={"batch": batch["id"]})
        not_a_batch = await client.get("/v1/jobs", params={"batch": other})
    ids = [job["id"] for job in listed.json()["jobs"]]
    assert len(ids) == 2 and other not in ids
    assert all(job["jobDetails"]["batchId"] == batch["id"] for job in listed.json()["jobs"])
    assert not_a_batch.status_code == 404


async def test_a_job_links_to_its_progress_message_on_matrix_to(tmp_path):
    async with running(tmp_path) as svc, svc.client() as client:
        job_id = await svc.submit("quick", token=None)
        plain = (await client.get(f"/v1/jobs/{job_id}")).json()
        await svc.app.store.save_message(ProgressMessage(
            job_id, "!room/x:example.org", "$event?1", "@ann:example.org", "$cmd"), time.time())
        linked = (await client.get(f"/v1/jobs/{job_id}")).json()
        listed = (await client.get("/v1/jobs")).json()["jobs"][0]
    assert "messageUrl" not in plain
    assert linked["messageUrl"] == "https://matrix.to/#/%21room%2Fx%3Aexample.org/%24event%3F1"
    assert "messageUrl" not in listed  # one store read per single-item answer, not per list row


async def test_message_not_sent_yet_gives_no_link(tmp_path):
    async with running(tmp_path) as svc, svc.client() as client:
        job_id = await svc.submit("quick", token=None)
        await svc.app.store.save_message(
            ProgressMessage(job_id, "!r:example.org", None, "@ann:example.org", "$cmd"), 1.0)
        event = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert "messageUrl" not in event


# -- the event stream ----------------------------------------------------------------------------


async def test_stream_starts_with_a_snapshot_then_worded_updates(tmp_path):
    async with running(tmp_path) as svc:
        done = await svc.submit("quick", token=None)
        running_id = await svc.submit("count", "60", token=None)
        async with svc.client() as client, client.stream("GET", "/v1/events") as response:
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert response.headers["cache-control"] == "no-cache"
            messages = sse_messages(response)
            kind, snapshot = await anext(messages)
            assert kind == "snapshot"
            assert {done, running_id} <= {item["event"]["id"] for item in snapshot["items"]}
            percents = []
            async for kind, data in messages:
                if kind == "update" and data["event"]["id"] == running_id:
                    percents.append(data["text"]["bar"])
                    if len(percents) >= 3 and percents[-1]:
                        break
    assert percents[-1] > 0
    text = data["text"]
    event = JobProgressEvent.model_validate(data["event"])
    assert text["percent"] == wording.shown_percent(event)
    assert text["counts"] == wording.counts(event)
    assert text["status"] == "running"
    assert text["attempt"] == "attempt 1/3"
    assert text["timing"] == wording.timing(event, data["sentAt"])
    assert text["eta"] == wording.eta(event)


async def test_quiet_running_job_gets_refreshed_so_its_elapsed_time_moves(tmp_path):
    async with running(tmp_path) as svc:
        job_id = await svc.submit("quiet", token=None)
        async with svc.client() as client, client.stream("GET", "/v1/events") as response:
            timings = []
            async for kind, data in sse_messages(response):
                item = data["items"] if kind == "snapshot" else [data]
                timings += [entry["text"]["timing"] for entry in item
                            if entry["event"]["id"] == job_id
                            and entry["event"]["status"] == "processing"]
                if len(set(timings)) >= 3:
                    break
    assert all(timing.endswith("elapsed") for timing in timings)  # "1s elapsed", "2s elapsed"…


async def test_stream_of_a_job_page_includes_its_old_job_and_a_batch_s_operations(tmp_path):
    async with running(tmp_path) as svc, svc.client() as client:
        batch = (await client.post("/v1/batches", json={"targets": ["quick", "quick"]})).json()
        for _ in range(feed.RECENT_JOBS + 1):  # push the batch out of "recent"
            await svc.submit("quick", token=None)
        await wait_for(lambda: svc.app.queue.running_count == 0)
        async with client.stream("GET", "/v1/events", params={"focus": batch["id"]}) as response:
            _, snapshot = await anext(sse_messages(response))
        async with client.stream("GET", "/v1/events", params={"focus": "j99999"}) as response:
            kind, unknown = await anext(sse_messages(response))
    ids = {item["event"]["id"] for item in snapshot["items"]}
    assert batch["id"] in ids
    operations = [item for item in snapshot["items"]
                  if item["event"].get("jobDetails", {}).get("batchId") == batch["id"]]
    assert len(operations) == 2
    assert kind == "snapshot" and "j99999" not in {i["event"]["id"] for i in unknown["items"]}


async def test_idle_stream_sends_keepalive_comments(tmp_path, monkeypatch):
    monkeypatch.setattr(feed, "KEEPALIVE_S", 0.2)
    async with running(tmp_path) as svc, svc.client() as client, \
            client.stream("GET", "/v1/events") as response:
        body = response.aiter_text()
        first = await anext(body)
        assert first.startswith("retry: 2000\n")
        assert ": keep-alive" in await anext(body)


async def test_leaving_pages_release_the_monitor_subscription(tmp_path):
    async with running(tmp_path) as svc, svc.client() as client:
        for _ in range(3):
            async with client.stream("GET", "/v1/events") as response:
                await anext(sse_messages(response))
                assert svc.app.monitor.subscriber_count == 1  # shared by every page
        await wait_for(lambda: svc.app.monitor.subscriber_count == 0, timeout=2.0)
        assert len(svc.api.streams) == 0


async def test_stopping_the_service_ends_event_streams_cleanly(tmp_path):
    async with running(tmp_path) as svc, svc.client() as client:
        await svc.submit("slow", token=None)
        async with client.stream("GET", "/v1/events") as response:
            messages = sse_messages(response)
            await anext(messages)
            began = time.monotonic()
            stopping = asyncio.ensure_future(svc.app.stop())
            rest = [message async for message in messages]  # ends without a read error
            await stopping
    assert time.monotonic() - began < 4.0
    assert all(kind in ("update", "refresh", "comment") for kind, _ in rest)
    assert svc.app.monitor.subscriber_count == 0


async def test_a_page_buffer_past_its_byte_limit_is_cut_off_and_let_go():
    client = feed.FeedClient(limit_bytes=30)
    ended = []
    client.on_overflow = lambda: ended.append(True)
    client.put(b"message 0\n")
    client.put(b"message 1\n")
    assert not client.overflowed and await client.take(0.01) == b"message 0\nmessage 1\n"
    for number in range(5):
        client.put(f"message {number}\n".encode())
    assert client.overflowed and ended == [True]  # the stream is ended at once, once
    assert await client.take(0.01) == feed.KEEPALIVE  # and its backlog is dropped


async def test_writes_to_a_page_are_cut_into_chunks():
    client = feed.FeedClient()
    for _ in range(3):
        client.put(b"x" * (feed.CHUNK_BYTES // 2 + 1))
    assert len(await client.take(0.01)) == feed.CHUNK_BYTES // 2 + 1


async def test_a_page_that_never_reads_is_cut_off_and_the_service_keeps_answering(tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr(feed, "CLIENT_LIMIT_BYTES", 64 * 1024)
    async with running(tmp_path, queue={"workers": 40}) as svc:
        host, port = svc.url.removeprefix("http://").split(":")
        # A tiny receive window, set before connecting: the connection stalls at once.
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect((host, int(port)))
        _, writer = await asyncio.open_connection(sock=raw)
        writer.transport.pause_reading()
        writer.write(f"GET /v1/events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        await writer.drain()
        monitor = svc.app.monitor  # the page's feed holds the one subscription while it lasts
        await wait_for(lambda: monitor.subscriber_count == 1, timeout=5.0)
        for _ in range(40):
            await svc.submit("count", "200", token=None)
        await wait_for(lambda: monitor.subscriber_count == 0, timeout=30.0)  # cut off
        async with svc.client() as client:
            assert (await client.get("/v1/status")).status_code == 200
        writer.close()


async def test_more_pages_than_the_limit_get_a_clear_503(tmp_path, monkeypatch):
    monkeypatch.setattr(dashboard, "MAX_PAGES", 1)
    async with running(tmp_path) as svc, svc.client() as client, \
            client.stream("GET", "/v1/events") as first:
        await anext(sse_messages(first))
        second = await client.get("/v1/events")
    assert second.status_code == 503
    assert "dashboard pages are open already" in second.json()["error"]["message"]


def test_matrix_to_link_names_the_bot_s_server_as_via():
    matrix = MatrixConfig(homeserver="https://matrix.example.org", user_id="@bot:example.org")
    assert matrix_to("!abc", "$e1", matrix) == "https://matrix.to/#/%21abc/%24e1?via=example.org"

"""The HTTP API through a real HTTP client against the service listening on a real socket."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx2
import pytest
from helpers import (
    SLOW_TARGET,
    counting_target,
    final_state,
    make_config,
    python_target,
    state_dir,
)
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from matrixjobs import __version__
from matrixjobs.api import ApiServer
from matrixjobs.api.client import ApiClient, user_agent
from matrixjobs.app import App
from matrixjobs.errors import ConfigError, MatrixJobsError, StoreError
from matrixjobs.models import Worker, parse_id
from matrixjobs.service import build_service
from matrixjobs.store.sqlite import SqliteStore

TOKEN = "s3cret-api-token"

COUNT = counting_target(0.02)
SLOW = SLOW_TARGET
QUICK = python_target("print('done')")
TARGETS = {"count": COUNT, "slow": SLOW, "quick": QUICK}


class Service:
    """A running service (App + ApiServer) and an HTTP client for it."""

    def __init__(self, app: App) -> None:
        self.app = app
        [self.api] = [c for c in app.components if isinstance(c, ApiServer)]

    def client(self, token: str | None = None, **kwargs: Any) -> httpx2.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx2.AsyncClient(base_url=self.api.url, headers=headers, timeout=20.0, **kwargs)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Factory: `svc = await service(api={...}, queue={...})`; stopped at teardown."""
    apps: list[App] = []

    async def start(**sections: Any) -> Service:
        sections.setdefault("targets", TARGETS)
        sections["api"] = {"listen": "127.0.0.1:0", **sections.get("api", {})}
        app = build_service(make_config(tmp_path, **sections))
        apps.append(app)
        try:
            await app.start()
        except BaseException:
            await app.stop()  # as daemon.serve does: the store and queue were started
            raise
        return Service(app)

    yield start
    for app in apps:
        await app.stop()


@pytest.fixture
async def svc(service) -> Service:
    return await service()


async def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def started(app: App, subject: str) -> None:
    async for event in app.watch(subject):
        if event.status != "pending":
            return


async def submit(client: httpx2.AsyncClient, target: str, *args: str) -> str:
    response = await client.post("/v1/jobs", json={"target": target, "args": list(args)})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def assert_error(response: httpx2.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return error


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# -- the server ---------------------------------------------------------------------------------


async def test_healthz_answers_ok(svc):
    async with svc.client() as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


async def test_service_runs_api_without_matrix_and_leaves_signals_alone(tmp_path):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    config = make_config(tmp_path, targets=TARGETS)
    assert config.matrix is None
    app = build_service(config)
    await app.start()
    try:
        assert {sig: signal.getsignal(sig) for sig in before} == before
        async with Service(app).client() as client:
            assert (await client.get("/healthz")).status_code == 200
    finally:
        await app.stop()
    assert {sig: signal.getsignal(sig) for sig in before} == before


async def test_api_can_be_switched_off(tmp_path):
    app = build_service(make_config(tmp_path, api={"enabled": False}))
    assert not any(isinstance(c, ApiServer) for c in app.components)


async def test_busy_port_is_a_clean_error(service, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = build_service(make_config(tmp_path, api={"listen": f"127.0.0.1:{port}"}))
        with pytest.raises(MatrixJobsError, match=f"cannot listen on 127.0.0.1:{port}"):
            await app.start()
        await app.stop()


async def test_non_loopback_address_without_token_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a loopback address"):
        build_service(make_config(tmp_path, api={"listen": "0.0.0.0:0"}))


async def test_non_loopback_address_with_token_starts(service):
    svc = await service(api={"listen": "0.0.0.0:0", "token": TOKEN})
    port = svc.api.address.port
    async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/v1/jobs")).status_code == 401
        ok = await client.get("/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200


async def test_resolving_the_listen_address_leaves_the_event_loop_free(service, monkeypatch):
    real_getaddrinfo = socket.getaddrinfo

    def slow_dns(*args, **kwargs):
        time.sleep(1.0)  # a resolver that takes its time, as DNS for a host name may
        return real_getaddrinfo(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_dns)
    gaps: list[float] = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            gaps.append(time.monotonic() - last)
            last = time.monotonic()

    ticker = asyncio.create_task(tick())
    try:
        await service()
    finally:
        ticker.cancel()
    assert max(gaps) < 0.5


async def test_unix_socket(service, tmp_path):
    path = tmp_path / "api.sock"
    path.touch()  # not a socket: refused
    with pytest.raises(MatrixJobsError, match="not a socket"):
        await service(api={"listen": f"unix:{path}"})
    path.unlink()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a socket file nobody listens on, as a killed service leaves it
    stale.close()
    svc = await service(api={"listen": f"unix:{path}"})
    assert path.is_socket()
    assert path.stat().st_mode & 0o777 == 0o660
    transport = httpx2.AsyncHTTPTransport(uds=str(path))
    async with httpx2.AsyncClient(transport=transport, base_url=svc.api.url) as client:
        assert (await client.get("/healthz")).status_code == 200
        job_id = await submit(client, "quick")
        async with client.stream("GET", f"/v1/status/{job_id}?stream=true") as response:
            lines = [json.loads(line) async for line in response.aiter_lines()]
        assert lines[-1]["status"] == "completed"
    # A second service on the same socket is refused while the first listens.
    (tmp_path / "other").mkdir()
    other = build_service(make_config(tmp_path / "other", api={"listen": f"unix:{path}"}))
    with pytest.raises(MatrixJobsError, match="another process is listening"):
        await other.start()
    await other.stop()
    assert path.is_socket()
    await svc.app.stop()
    assert not path.exists()


# -- jobs ---------------------------------------------------------------------------------------


async def test_submit_job_answers_201_with_the_new_job(svc):
    async with svc.client() as client:
        response = await client.post("/v1/jobs", json={"target": "count", "args": ["3"]})
        assert response.status_code == 201, response.text
        job = response.json()
        assert job["id"].startswith("j")
        assert job["type"] == "job"
        assert job["name"] == "count 3"
        assert job["status"] in ("pending", "processing")
        assert job["jobDetails"]["jobType"] == "command"
        assert response.headers["location"] == f"/v1/jobs/{job['id']}"
        await final_state(svc.app, job["id"])
        done = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert done["status"] == "completed"
    assert done["progress"]["percentage"] == 100.0


async def test_job_and_status_endpoints_show_the_same_event(svc):
    async with svc.client() as client:
        job_id = await submit(client, "count", "2")
        await final_state(svc.app, job_id)
        by_job = (await client.get(f"/v1/jobs/{job_id}")).json()
        by_status = await client.get(f"/v1/status/{job_id}")
        assert by_status.headers["content-type"] == "application/json"
        by_status = by_status.json()
        for event in (by_job, by_status):
            event.pop("updatedAt")
        assert by_job == by_status
        upper = await client.get(f"/v1/status/{job_id.upper()}?stream=false")
        assert upper.json()["id"] == job_id


async def test_list_jobs_newest_first_with_status_filter_and_limit(svc):
    async with svc.client() as client:
        done = await submit(client, "quick")
        await final_state(svc.app, done)
        running = await submit(client, "slow")
        await started(svc.app, running)

        listed = (await client.get("/v1/jobs")).json()["jobs"]
        assert [job["id"] for job in listed] == [running, done]
        assert listed[0]["status"] == "processing"
        active = (await client.get("/v1/jobs?status=pending,processing")).json()["jobs"]
        assert [job["id"] for job in active] == [running]
        repeated = await client.get("/v1/jobs", params=[("status", "completed"),
                                                         ("status", "failed")])
        assert [job["id"] for job in repeated.json()["jobs"]] == [done]
        limited = (await client.get("/v1/jobs?limit=1")).json()["jobs"]
        assert [job["id"] for job in limited] == [running]


async def test_status_without_an_id_lists_what_is_active_batches_first(svc):
    """The same list as the bot's `!status`, MCP `status` and `matrixjobs status`: a
    batch's operations show in their batch, not again on their own."""
    async with svc.client() as client:
        done = await submit(client, "quick")
        await final_state(svc.app, done)
        job = await submit(client, "slow")
        batch = await client.post("/v1/batches", json={"targets": ["slow", "slow"]})
        batch_id = batch.json()["id"]
        await started(svc.app, job)
        active = (await client.get("/v1/status")).json()["active"]
        assert [item["id"] for item in active] == [batch_id, job]
        assert active[1]["status"] == "processing"
        assert [e.id for e in await svc.app.active()] == [batch_id, job]


async def test_cancel_running_job_answers_its_final_state_then_409(svc):
    async with svc.client() as client:
        job_id = await submit(client, "slow")
        await started(svc.app, job_id)
        response = await client.post(f"/v1/jobs/{job_id}/cancel")
        assert response.status_code == 200, response.text
        assert response.json()["id"] == job_id
        assert response.json()["status"] == "cancelled"
        again = await client.post(f"/v1/jobs/{job_id}/cancel")
        assert "already cancelled" in assert_error(again, 409, "already_finished")["message"]


# -- batches ------------------------------------------------------------------------------------


async def test_submit_batch_answers_201_then_lists_and_shows_it(svc):
    async with svc.client() as client:
        response = await client.post("/v1/batches",
                                     json={"targets": ["quick", "count"], "name": "both"})
        assert response.status_code == 201, response.text
        batch = response.json()
        assert batch["id"].startswith("b")
        assert batch["type"] == "batch"
        assert batch["name"] == "both"
        assert batch["batchDetails"]["totalOperations"] == 2
        assert response.headers["location"] == f"/v1/batches/{batch['id']}"
        await final_state(svc.app, batch["id"])

        shown = (await client.get(f"/v1/batches/{batch['id']}")).json()
        assert shown["status"] == "completed"
        assert shown["batchDetails"]["completedOperations"] == 2
        listed = (await client.get("/v1/batches?status=completed")).json()["batches"]
        assert [b["id"] for b in listed] == [batch["id"]]
        assert (await client.get("/v1/batches?status=pending")).json() == {"batches": []}
        members = (await client.get("/v1/jobs")).json()["jobs"]
        assert {job["jobDetails"]["batchId"] for job in members} == {batch["id"]}


async def test_batch_name_defaults_to_its_targets(svc):
    async with svc.client() as client:
        response = await client.post("/v1/batches", json={"targets": ["quick", "quick"]})
    assert response.status_code == 201
    assert response.json()["name"] == "quick quick"


async def test_cancel_batch_answers_its_final_state_then_409(svc):
    async with svc.client() as client:
        response = await client.post("/v1/batches", json={"targets": ["slow", "slow"]})
        batch_id = response.json()["id"]
        await started(svc.app, batch_id)
        cancelled = await client.post(f"/v1/batches/{batch_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["batchDetails"]["cancelledOperations"] == 2
        assert_error(await client.post(f"/v1/batches/{batch_id}/cancel"), 409,
                     "already_finished")


async def test_rerun_answers_201_with_the_new_job_or_batch_and_404_for_unknown_ids(svc):
    async with svc.client() as client:
        job = await submit(client, "count")
        response = await client.post(f"/v1/jobs/{job}/rerun", headers={"User-Agent": "curl"})
        assert response.status_code == 201, response.text
        rerun = response.json()
        assert rerun["id"] != job and rerun["name"] == "count"
        assert rerun["requester"] == "api"
        assert response.headers["location"] == f"/v1/jobs/{rerun['id']}"
        batch = (await client.post("/v1/batches", json={"targets": ["quick", "count"],
                                                         "name": "both"})).json()["id"]
        response = await client.post(f"/v1/batches/{batch}/rerun")
        assert response.status_code == 201, response.text
        assert response.json()["name"] == "both" and response.json()["id"] != batch
        assert response.headers["location"] == f"/v1/batches/{response.json()['id']}"
        assert_error(await client.post("/v1/jobs/j999/rerun"), 404, "not_found")
        assert_error(await client.post(f"/v1/jobs/{batch}/rerun"), 404, "not_found")
        assert_error(await client.post("/v1/batches/b999/rerun"), 404, "not_found")
        assert_error(await client.get(f"/v1/jobs/{job}/rerun"), 405, "method_not_allowed")


# -- bad requests -------------------------------------------------------------------------------

BAD_REQUESTS = [
    # (method, path, body: JSON-able, or bytes sent as is, status, code)
    ("POST", "/v1/jobs", b"{not json", 400, "bad_json"),
    ("POST", "/v1/jobs", b"", 400, "bad_json"),
    ("POST", "/v1/jobs", [], 400, "bad_body"),
    ("POST", "/v1/jobs", {}, 400, "bad_body"),
    ("POST", "/v1/jobs", {"target": 3}, 400, "bad_body"),
    ("POST", "/v1/jobs", {"target": "count", "args": "3"}, 400, "bad_body"),
    ("POST", "/v1/jobs", {"target": "count", "args": [3]}, 400, "bad_body"),
    ("POST", "/v1/jobs", {"target": "quick", "priority": 9}, 400, "bad_body"),
    ("POST", "/v1/jobs", b'{"target": "' + b"x" * 70_000 + b'"}', 413, "body_too_large"),
    ("POST", "/v1/jobs", {"target": "nope"}, 404, "unknown_target"),
    ("POST", "/v1/jobs", {"target": "quick", "args": ["x"]}, 422, "bad_arguments"),
    ("POST", "/v1/jobs", {"target": "count", "args": ["-rf"]}, 422, "bad_arguments"),
    ("POST", "/v1/batches", {}, 400, "bad_body"),
    ("POST", "/v1/batches", {"targets": "quick"}, 400, "bad_body"),
    ("POST", "/v1/batches", {"targets": []}, 422, "bad_batch"),
    ("POST", "/v1/batches", {"targets": ["quick"] * 51}, 422, "bad_batch"),
    ("POST", "/v1/batches", {"targets": ["quick", "nope"]}, 404, "unknown_target"),
    ("GET", "/v1/jobs/j999", None, 404, "not_found"),
    ("GET", "/v1/jobs/b1", None, 404, "not_found"),
    ("GET", "/v1/jobs/x1", None, 404, "not_found"),
    ("GET", "/v1/batches/b999", None, 404, "not_found"),
    ("GET", "/v1/status/j999", None, 404, "not_found"),
    ("GET", "/v1/status/nonsense", None, 404, "not_found"),
    ("GET", "/v1/jobs/j99999999999999999999", None, 404, "not_found"),
    ("GET", "/v1/status/b99999999999999999999?stream=true", None, 404, "not_found"),
    ("POST", "/v1/batches/b99999999999999999999/cancel", None, 404, "not_found"),
    ("GET", "/v1/status/j999?stream=true", None, 404, "not_found"),
    ("GET", "/v1/status/j1?stream=maybe", None, 400, "bad_query"),
    ("POST", "/v1/jobs/j999/cancel", None, 404, "not_found"),
    ("POST", "/v1/batches/b999/cancel", None, 404, "not_found"),
    ("POST", "/v1/batches/j1/cancel", None, 404, "not_found"),
    ("GET", "/v1/jobs?status=running", None, 400, "bad_query"),
    ("GET", "/v1/jobs?limit=0", None, 400, "bad_query"),
    ("GET", "/v1/batches?limit=ten", None, 400, "bad_query"),
    ("GET", "/v1/jobs?limt=5", None, 400, "bad_query"),
    ("GET", "/v1/status/j1?stram=true", None, 400, "bad_query"),
    ("GET", "/v1/workers?x=1", None, 400, "bad_query"),
    ("GET", "/v1/nothing", None, 404, "not_found"),
    ("DELETE", "/v1/jobs", None, 405, "method_not_allowed"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), BAD_REQUESTS,
                         ids=[f"{m} {p[:30]} {c}" for m, p, _, _, c in BAD_REQUESTS])
async def test_bad_request_answers_json_error(svc, method, path, body, status, code):
    kwargs: dict[str, Any] = {}
    if isinstance(body, bytes):
        kwargs["content"] = body
    elif body is not None:
        kwargs["json"] = body
    async with svc.client() as client:
        assert_error(await client.request(method, path, **kwargs), status, code)
        assert svc.app.monitor.subscriber_count == 0


def test_only_ascii_digits_within_sqlite_integers_make_an_id():
    assert parse_id(" J12 ") == ("j", 12)
    assert parse_id(f"b{2**63 - 1}") == ("b", 2**63 - 1)
    assert parse_id(f"b{2**63}") is None
    assert parse_id("j\u0661\u0662") is None  # Arabic-Indic "12"
    assert parse_id("j" + "9" * 5000) is None  # more digits than int() reads


async def test_an_unknown_query_parameter_is_named_short_and_escaped(svc):
    async with svc.client() as client:
        response = await client.get("/v1/workers", params={"\u202eevil" + "x" * 5000: "1"})
    message = assert_error(response, 400, "bad_query")["message"]
    assert "\\u202e" in message and "\u202e" not in message and len(message) < 200


async def test_wrong_method_names_every_method_the_path_takes(svc):
    async with svc.client() as client:
        for path in ("/v1/jobs", "/v1/batches"):
            response = await client.delete(path)
            assert_error(response, 405, "method_not_allowed")
            assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}


# -- the fleet ----------------------------------------------------------------------------------


async def test_workers_lists_this_node_with_its_running_job_and_a_silent_one(service, tmp_path):
    svc = await service(queue={"workers": 2, "lease_s": 30},
                        worker={"name": "build-01", "labels": ["gpu", "arm"]})
    now = time.time()
    await svc.app.store.register_worker(Worker(
        id="gone:1:ab", name="build-02", host="gone", pid=1, role="worker", labels=[], slots=4,
        version="0.0.9", started_at=now - 3600, heartbeat_at=now - 125))
    async with svc.client() as client:
        job_id = await submit(client, "slow")
        await started(svc.app, job_id)
        response = await client.get("/v1/workers")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    here, gone = response.json()["workers"]
    assert {k: v for k, v in here.items() if not k.endswith("At")} == {
        "id": svc.app.queue.owner, "name": "build-01", "host": socket.gethostname(),
        "pid": os.getpid(), "role": "run", "labels": ["arm", "gpu"], "slots": 2,
        "version": __version__, "running": [job_id], "alive": True, "silentFor": None}
    assert here["startedAt"] == here["heartbeatAt"]
    assert abs(datetime.fromisoformat(here["startedAt"]).timestamp() - now) < 5
    assert (gone["name"], gone["alive"], gone["running"]) == ("build-02", False, [])
    assert 125 <= gone["silentFor"] < 135
    await svc.app.stop()  # a clean stop takes this node's row away; the silent one stays
    store = SqliteStore(state_dir(tmp_path) / "matrixjobs.db")
    await store.open()
    try:
        assert [w.name for w in await store.list_workers()] == ["build-02"]
    finally:
        await store.close()


class LosesTheDatabaseAtStop(SqliteStore):
    async def unregister_worker(self, worker_id: str) -> None:
        raise StoreError("database gone")


async def test_a_worker_row_that_cannot_be_removed_at_stop_is_a_warning(tmp_path, caplog):
    config = make_config(tmp_path, targets=TARGETS)
    app = App(config, store=LosesTheDatabaseAtStop(tmp_path / "s.db"))
    await app.start()
    await app.stop()
    assert "could not remove this worker's row (StoreError)" in caplog.text
    with pytest.raises(StoreError, match="not open"):  # the stop went on to close it
        await app.store.list_workers()


# -- auth ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/status/j1?stream=true", "/healthz/",
                                  "/v1/healthz", "/mcp", "/nowhere", "/metrics",
                                  "/v1/openapi.json"])
async def test_token_is_required_on_every_endpoint_but_healthz(service, path):
    svc = await service(api={"token": TOKEN})
    async with svc.client() as client:
        missing = await client.get(path)
        assert_error(missing, 401, "unauthorized")
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert_error(await client.get(path, headers={"Authorization": "Bearer wrong"}),
                     401, "unauthorized")
        assert_error(await client.get(path, headers={"Authorization": f"Basic {TOKEN}"}),
                     401, "unauthorized")
    assert svc.app.monitor.subscriber_count == 0


async def test_healthz_answers_probes_without_a_token_and_tells_nothing_else(service):
    svc = await service(api={"token": TOKEN})
    async with svc.client() as client:
        for method in ("GET", "HEAD"):
            response = await client.request(method, "/healthz")
            assert response.status_code == 200
        response = await client.get("/healthz", headers={"Authorization": "Bearer wrong"})
        assert response.json() == {"status": "ok", "version": __version__}
        assert_error(await client.post("/healthz"), 405, "method_not_allowed")


async def test_healthz_says_stopping_with_503_once_the_service_stops(service):
    svc = await service(api={"token": TOKEN})
    await svc.app.queue.stop(0)  # what App.stop does first: no new work from here on
    async with svc.client() as client:
        response = await client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "stopping", "version": __version__}


async def test_right_token_gets_in(service):
    svc = await service(api={"token": TOKEN})
    async with svc.client(TOKEN) as client:
        job_id = await submit(client, "quick")
        await final_state(svc.app, job_id)
        assert (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "completed"


async def test_without_token_foreign_host_and_cross_origin_requests_are_forbidden(svc):
    """A web page must not reach a tokenless API (DNS rebinding, cross-site POST)."""
    port = svc.api.address.port
    async with svc.client() as client:
        assert_error(await client.get("/v1/jobs", headers={"Host": f"evil.example:{port}"}),
                     403, "forbidden")
        cross = await client.post("/v1/jobs", json={"target": "quick"},
                                  headers={"Origin": "https://evil.example"})
        assert_error(cross, 403, "forbidden")
        same = await client.get("/v1/jobs", headers={"Origin": f"http://127.0.0.1:{port}"})
        assert same.status_code == 200
        local = await client.get("/healthz", headers={"Host": f"localhost:{port}"})
        assert local.status_code == 200
    assert await svc.app.jobs() == []


# -- NDJSON streams -----------------------------------------------------------------------------


async def read_stream(client: httpx2.AsyncClient, subject: str) -> tuple[httpx2.Response,
                                                                          list[dict[str, Any]]]:
    async with client.stream("GET", f"/v1/status/{subject}", params={"stream": "true"}) as resp:
        lines = [line async for line in resp.aiter_lines()]
    assert all(line for line in lines), lines  # one JSON object per line, no blank lines
    return resp, [json.loads(line) for line in lines]


async def test_stream_follows_a_job_line_by_line_until_it_ends(svc):
    async with svc.client() as client:
        job_id = await submit(client, "count", "40")
        response, events = await read_stream(client, job_id)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.headers
    assert {event["id"] for event in events} == {job_id}
    assert events[0]["status"] in ("pending", "processing")  # the state when we asked
    assert events[-1]["status"] == "completed"
    assert all(event["status"] in ("pending", "processing") for event in events[:-1])
    percentages = [e["progress"]["percentage"] for e in events if "progress" in e]
    assert len(percentages) >= 3, events  # throttled updates in between, not just the ends
    assert percentages == sorted(percentages)
    assert percentages[-1] == 100.0
    updated = [event["updatedAt"] for event in events]
    assert updated == sorted(updated)


async def test_stream_of_a_finished_job_is_one_line(svc):
    async with svc.client() as client:
        job_id = await submit(client, "quick")
        await final_state(svc.app, job_id)
        response, events = await read_stream(client, job_id)
    assert response.status_code == 200
    assert [event["status"] for event in events] == ["completed"]
    assert svc.app.monitor.subscriber_count == 0


async def test_stream_follows_a_batch(svc):
    async with svc.client() as client:
        response = await client.post("/v1/batches", json={"targets": ["count", "count"]})
        batch_id = response.json()["id"]
        _, events = await read_stream(client, batch_id)
    assert {event["type"] for event in events} == {"batch"}
    assert events[-1]["status"] == "completed"
    done = [event["batchDetails"]["completedOperations"] for event in events]
    assert done == sorted(done)
    assert done[-1] == 2


async def test_stream_of_unknown_id_is_a_404_json_error(svc):
    async with svc.client() as client, \
            client.stream("GET", "/v1/status/b77?stream=true") as response:
        await response.aread()
    assert_error(response, 404, "not_found")
    assert svc.app.monitor.subscriber_count == 0


async def test_dropped_stream_of_a_quiet_job_releases_its_subscription(service):
    """A client leaving is noticed at once, not at the job's next event (it may never come)."""
    svc = await service(queue={"workers": 1})
    async with svc.client() as client:
        busy = await submit(client, "slow")
        await started(svc.app, busy)
        waiting = await submit(client, "quick")  # stays pending behind `busy`: no events
        async with client.stream("GET", f"/v1/status/{waiting}?stream=true") as response:
            async for line in response.aiter_lines():
                assert json.loads(line)["status"] == "pending"
                assert svc.app.monitor.subscriber_count == 1
                break
        await wait_until(lambda: svc.app.monitor.subscriber_count == 0, timeout=2.0)
        assert len(svc.api.streams) == 0
        assert (await client.get(f"/v1/jobs/{waiting}")).json()["status"] == "pending"


async def test_dropping_a_thousand_streams_leaks_nothing(svc):
    """Open and drop 1,000 streams on a running job: tasks, subscriptions, memory return."""
    app = svc.app
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=0)
    async with svc.client(limits=limits) as client:
        job_id = await submit(client, "slow")
        await started(app, job_id)

        async def open_and_drop() -> None:
            async with client.stream("GET", f"/v1/status/{job_id}?stream=true") as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    assert json.loads(line)["id"] == job_id
                    break

        async def round_of(count: int) -> None:
            await asyncio.gather(*(open_and_drop() for _ in range(count)))

        def settled() -> bool:
            return app.monitor.subscriber_count == 0 and len(svc.api.streams) == 0

        await round_of(100)  # warm up: imports, caches, allocator pools
        await wait_until(settled)
        await asyncio.sleep(0.2)
        tasks_before = len(asyncio.all_tasks())
        rss_before = rss_bytes()

        peak = 0
        for _ in range(10):
            rounds = asyncio.ensure_future(round_of(100))
            while not rounds.done():
                peak = max(peak, app.monitor.subscriber_count)
                await asyncio.sleep(0.005)
            await rounds
        assert peak >= 50  # the streams really were open at the same time

        await wait_until(settled)
        await wait_until(lambda: len(asyncio.all_tasks()) <= tasks_before + 2)
        growth = rss_bytes() - rss_before
        print(f"peak {peak} subscribers, tasks {tasks_before} -> {len(asyncio.all_tasks())}, "
              f"RSS {rss_before / 1e6:.1f} MB -> +{growth / 1e6:.1f} MB")
        assert growth < 20 * 1024 * 1024, f"RSS grew by {growth / 1e6:.1f} MB"
        status = (await client.get(f"/v1/jobs/{job_id}")).json()["status"]
        assert status == "processing"  # watching and dropping never touched the job


async def test_stopping_the_service_ends_open_streams_cleanly(svc):
    async with svc.client() as client:
        job_id = await submit(client, "slow")
        await started(svc.app, job_id)
        async with client.stream("GET", f"/v1/status/{job_id}?stream=true") as response:
            lines = response.aiter_lines()
            first = json.loads(await anext(lines))
            assert first["status"] == "processing"
            began = time.monotonic()
            stopping = asyncio.ensure_future(svc.app.stop())
            rest = [json.loads(line) async for line in lines]  # ends without a read error
            await stopping
    assert time.monotonic() - began < 4.0
    assert all(event["id"] == job_id for event in rest)
    assert svc.app.monitor.subscriber_count == 0


async def test_while_stopping_submits_get_503_and_the_running_job_is_still_followed(svc):
    async with svc.client() as client:
        job_id = await submit(client, "count", "40")  # 0.8 s of work
        await started(svc.app, job_id)
        stopping = asyncio.ensure_future(svc.app.stop(grace_s=20))
        await asyncio.sleep(0.1)
        refused = await client.post("/v1/jobs", json={"target": "quick"})
        assert refused.status_code == 503
        assert refused.json()["error"]["message"] == (
            "matrixjobs is shutting down; send it again once it is back")
        batch = await client.post("/v1/batches", json={"targets": ["quick"]})
        assert batch.status_code == 503
        state = (await client.get(f"/v1/status/{job_id}")).json()
        assert state["status"] == "processing"  # the API keeps answering during the grace
        await stopping
    store = SqliteStore(svc.app.config.store.path)
    await store.open()
    try:
        assert (await store.get_job(job_id)).status == "completed"  # finished within the grace
    finally:
        await store.close()


# -- room for more (MCP will be mounted at /mcp) ------------------------------------------------


async def hello(request):
    return PlainTextResponse("hello")


async def test_mounted_app_shares_the_server_auth_and_lifespan(tmp_path):
    steps: list[str] = []

    @asynccontextmanager
    async def lifespan():
        steps.append("enter")
        yield
        steps.append("exit")

    app = build_service(make_config(tmp_path, api={"token": TOKEN}))
    svc = Service(app)
    svc.api.mount("/extra", Starlette(routes=[Route("/", hello)]), lifespan)
    await app.start()
    try:
        assert steps == ["enter"]
        async with svc.client() as anonymous:
            assert_error(await anonymous.get("/extra/"), 401, "unauthorized")
        async with svc.client(TOKEN) as client:
            assert (await client.get("/extra/")).text == "hello"
            assert (await client.get("/healthz")).status_code == 200
    finally:
        await app.stop()
    assert steps == ["enter", "exit"]


async def test_failing_lifespan_is_a_clean_start_error(tmp_path):
    @asynccontextmanager
    async def broken():
        raise RuntimeError("session manager would not start")
        yield

    path = tmp_path / "api.sock"
    app = build_service(make_config(tmp_path, api={"listen": f"unix:{path}"}))
    Service(app).api.mount("/broken", Starlette(), broken)
    with pytest.raises(MatrixJobsError, match="could not start: session manager"):
        await app.start()
    await app.stop()
    assert not path.exists()


async def test_each_submit_records_who_asked_and_a_claimed_name_is_not_taken(svc):
    async with svc.client() as client:
        plain = await submit(client, "quick")
        cli = await client.post("/v1/jobs", json={"target": "quick"},
                                headers={"User-Agent": user_agent("cli")})
        forged = await client.post("/v1/batches", json={"targets": ["quick"]},
                                   headers={"User-Agent": "@boss:example.org"})
        assert (await client.get(f"/v1/jobs/{plain}")).json()["requester"] == "api"
        assert cli.json()["requester"] == "cli"
        assert forged.json()["requester"] == "api"
    async with ApiClient(svc.api.url, client="mcp") as api:
        assert (await api.submit("quick", [])).requester == "mcp"


# -- job logs -----------------------------------------------------------------------------------


async def test_log_of_a_finished_job_is_its_text(svc):
    async with svc.client() as client:
        job_id = await submit(client, "quick")
        await final_state(svc.app, job_id)
        response = await client.get(f"/v1/jobs/{job_id}/log")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.text.splitlines()[1:] == ["done", "── completed ──"]


async def test_log_of_an_unknown_or_a_batch_id_is_404(svc):
    async with svc.client() as client:
        for path in ("/v1/jobs/j999/log", "/v1/jobs/b1/log", "/v1/jobs/j999/log?follow=true"):
            assert_error(await client.get(path), 404, "not_found")
        assert_error(await client.get("/v1/jobs/j1/log?follow=maybe"), 400, "bad_query")


async def test_log_follow_streams_a_running_job_and_ends_when_it_ends(svc):
    async with svc.client() as client:
        job_id = await submit(client, "count", "30")
        await started(svc.app, job_id)
        chunks = []
        async with client.stream("GET", f"/v1/jobs/{job_id}/log",
                                 params={"follow": "true"}) as response:
            async for chunk in response.aiter_text():
                chunks.append(chunk)
        assert response.headers["transfer-encoding"] == "chunked"
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert len(chunks) >= 2, chunks  # output came while it ran, not all at the end
    text = "".join(chunks)
    assert text.splitlines()[-2:] == ["::progress 30/30 step 30", "── completed ──"]
    assert text == await svc.app.log(job_id)
    assert (await svc.app.status(job_id)).status == "completed"

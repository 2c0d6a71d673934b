"""MCP through the SDK's own client: in memory and over streamable HTTP, both protocol
generations; plus `matrixjobs mcp` (stdio) against the running service."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from helpers import SLOW_TARGET, counting_target, final_state, make_config, python_target
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

import matrixjobs.mcp.server as mcp_server
from matrixjobs.api import ApiServer
from matrixjobs.app import App
from matrixjobs.mcp import AppBackend, build_mcp_server
from matrixjobs.service import build_service

TOKEN = "mcp-test-token"
COUNT = counting_target(0.03)
SLOW = SLOW_TARGET
QUIET = python_target("import time; time.sleep(1.2)")
# 3000 lines of 100 characters: more than the `logs` tool gives at once.
WORDY = python_target("for n in range(3000): print(f'{n:05d}' + 'x' * 94)")
TARGETS = {"count": COUNT, "slow": SLOW, "quiet": QUIET, "wordy": WORDY}
MODES = ["auto", "legacy"]
TOOLS = {"status", "list_jobs", "submit_build", "submit_batch", "rerun", "cancel", "approve",
         "deny", "logs", "workers", "schedules", "pause_schedule"}


class Service:
    def __init__(self, app: App) -> None:
        self.app = app
        [self.api] = [c for c in app.components if isinstance(c, ApiServer)]

    @property
    def mcp_url(self) -> str:
        return f"{self.api.url}/mcp"


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[Service]:
    config = make_config(tmp_path, targets=TARGETS, api={"token": TOKEN})
    app = build_service(config)
    await app.start()
    try:
        yield Service(app)
    finally:
        await app.stop()


def http_transport(svc: Service) -> AbstractAsyncContextManager[Any]:
    client = httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"},
                                timeout=httpx2.Timeout(30.0, read=300.0))
    return streamable_http_client(svc.mcp_url, http_client=client)


@pytest.fixture(params=[(t, m) for t in ("memory", "http") for m in MODES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def connect(request: pytest.FixtureRequest, svc: Service) -> Callable[[], Client]:
    """`async with connect() as client:` over the parametrized transport and mode."""
    transport, mode = request.param

    def make() -> Client:
        if transport == "memory":
            return Client(build_mcp_server(AppBackend(svc.app)), mode=mode)
        return Client(http_transport(svc), mode=mode)

    return make


async def call(client: Client, name: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(name, arguments)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


async def call_error(client: Client, name: str, **arguments: Any) -> str:
    result = await client.call_tool(name, arguments)
    assert result.is_error
    return " ".join(getattr(part, "text", "") for part in result.content)


async def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- the tools ----------------------------------------------------------------------------------


async def test_lists_tools(connect, request):
    async with connect() as client:
        version = client.session.protocol_version
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    assert set(tools["status"].input_schema["properties"]) == {"id", "stream", "max_wait_s"}
    assert tools["status"].output_schema is not None
    legacy = request.node.callspec.params["connect"][1] == "legacy"
    assert (version == "2025-11-25") if legacy else (version >= "2026"), version


async def test_submit_then_stream_status_until_completed(connect):
    updates: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, total, message))

    async with connect() as client:
        job = await call(client, "submit_build", target="count", args=["10"])
        assert job["id"].startswith("j") and job["status"] in ("pending", "processing")
        result = await client.call_tool("status", {"id": job["id"], "stream": True},
                                        progress_callback=on_progress)
    assert not result.is_error, result.content
    final = result.structured_content
    assert final["endedBy"] == "finished" and final["terminal"] is True
    assert final["state"]["status"] == "completed"
    assert final["state"]["progress"]["percentage"] == 100.0
    assert len(updates) >= 2 and len(updates) == final["notifications"]
    progress = [update[0] for update in updates]
    assert progress == sorted(set(progress))  # strictly increasing
    assert updates[-1][2].startswith(f"{job['id']} completed")
    assert any("processing" in (update[2] or "") for update in updates)


async def test_status_now_max_wait_and_cancel(connect, svc):
    async with connect() as client:
        job = await call(client, "submit_build", target="slow")
        now = await call(client, "status", id=job["id"])
        assert now["endedBy"] == "now" and now["terminal"] is False
        started = time.monotonic()
        waited = await call(client, "status", id=job["id"], stream=True, max_wait_s=0.4)
        assert 0.3 < time.monotonic() - started < 5
        assert waited["endedBy"] == "max_wait" and waited["terminal"] is False
        assert waited["state"]["status"] in ("pending", "processing")
        active = await call(client, "status")
        assert job["id"] in [item["id"] for item in active["active"]]
        listed = await call(client, "list_jobs", status=["pending", "processing"])
        assert job["id"] in [item["id"] for item in listed["jobs"]]
        cancelled = await call(client, "cancel", id=job["id"])
        assert cancelled["status"] == "cancelled"
        assert "already" in (await call_error(client, "cancel", id=job["id"])).lower()
    assert (await svc.app.status(job["id"])).status == "cancelled"


async def test_rerun_queues_the_same_target_again(connect, svc):
    async with connect() as client:
        job = await call(client, "submit_build", target="count", args=["2"])
        rerun = await call(client, "rerun", id=job["id"])
        assert rerun["id"] != job["id"] and rerun["name"] == "count 2"
        assert rerun["requester"] == "mcp"
        assert "no job j999" in (await call_error(client, "rerun", id="j999")).lower()
    assert (await final_state(svc.app, rerun["id"])).status == "completed"


async def test_cancelled_stream_stops_watching_not_the_job(connect, svc):
    async with connect() as client:
        baseline = svc.app.monitor.subscriber_count
        job = await call(client, "submit_build", target="count", args=["30"])
        with pytest.raises((MCPError, TimeoutError)):
            await client.call_tool("status", {"id": job["id"], "stream": True},
                                   read_timeout_seconds=0.3)
        assert (await call(client, "status", id=job["id"]))["state"]["status"] != "cancelled"
        # The server's watch ended with the call: no subscription left behind.
        await wait_until(lambda: svc.app.monitor.subscriber_count == baseline)
    assert (await final_state(svc.app, job["id"])).status == "completed"


async def test_errors_are_tool_errors(connect):
    async with connect() as client:
        assert "no job j999" in await call_error(client, "status", id="j999")
        assert "no job j999" in await call_error(client, "status", id="j999", stream=True)
        assert "not a job or batch id" in await call_error(client, "status", id="nonsense")
        assert "needs an id" in await call_error(client, "status", stream=True)
        assert "unknown target 'nope'" in await call_error(client, "submit_build", target="nope")
        message = await call_error(client, "submit_build", target="count", args=["x y"])
        assert "count" in message or "argument" in message.lower()
        assert "unknown target" in await call_error(client, "submit_batch", targets=["count", "x"])
        assert await call_error(client, "submit_batch", targets=[])
        assert await call_error(client, "status", id="j1", max_wait_s=-1)


async def test_logs_gives_the_last_lines_within_its_bound(connect, svc):
    async with connect() as client:
        job = await call(client, "submit_build", target="wordy")
        await final_state(svc.app, job["id"])
        three = await call(client, "logs", id=job["id"], lines=3)
        assert three["text"].splitlines() == [
            "02998" + "x" * 94, "02999" + "x" * 94, "── completed ──"]
        assert three["lines"] == 3
        most = await call(client, "logs", id=job["id"], lines=2000)
        assert len(most["text"].encode()) <= mcp_server.MAX_LOG_BYTES
        assert most["text"].endswith("02999" + "x" * 94 + "\n── completed ──\n")
        assert most["text"].startswith("0")  # starts at a whole line
        assert "no job j999" in await call_error(client, "logs", id="j999")


async def test_workers_lists_this_node_with_its_running_job(connect, svc):
    async with connect() as client:
        job = await call(client, "submit_build", target="slow")
        await wait_until(lambda: svc.app.monitor.current(job["id"]) is not None)
        [here] = (await call(client, "workers"))["workers"]
    assert (here["id"], here["role"], here["alive"], here["silentFor"]) == (
        svc.app.queue.owner, "run", True, None)
    assert here["running"] == [job["id"]] and here["slots"] == 4


async def test_batch_streams_to_its_end(connect):
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with connect() as client:
        batch = await call(client, "submit_batch", targets=["count", "count"])
        assert batch["id"].startswith("b")
        result = await client.call_tool("status", {"id": batch["id"], "stream": True},
                                        progress_callback=on_progress)
    final = result.structured_content
    assert final["state"]["status"] == "completed"
    assert final["state"]["batchDetails"]["completedOperations"] == 2
    assert seen and seen == sorted(set(seen))


# -- details ------------------------------------------------------------------------------------


async def test_heartbeat_while_nothing_happens(svc, monkeypatch):
    monkeypatch.setattr(mcp_server, "HEARTBEAT_S", 0.2)
    messages: list[str | None] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message)

    async with Client(build_mcp_server(AppBackend(svc.app))) as client:
        job = await call(client, "submit_build", target="quiet")
        result = await client.call_tool("status", {"id": job["id"], "stream": True},
                                        progress_callback=on_progress)
    assert result.structured_content["state"]["status"] == "completed"
    assert sum("(no change)" in (m or "") for m in messages) >= 2


async def test_http_mcp_needs_the_token(svc):
    async with httpx2.AsyncClient() as client:
        response = await client.post(svc.mcp_url, json={})
    assert response.status_code == 401


async def test_mcp_can_be_switched_off(tmp_path):
    app = build_service(make_config(tmp_path, mcp={"enabled": False}))
    [api] = [c for c in app.components if isinstance(c, ApiServer)]
    assert not api._mounts


@asynccontextmanager
async def stdio_client(svc: Service, mode: str) -> AsyncIterator[Client]:
    env = {**os.environ, "MATRIXJOBS_API_TOKEN": TOKEN}
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "matrixjobs", "mcp", "--api", svc.api.url],
                                   env=env)
    async with Client(params, mode=mode) as client:
        yield client


@pytest.mark.parametrize("mode", MODES)
async def test_stdio_subprocess_against_the_service(svc, mode):
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async with stdio_client(svc, mode) as client:
        assert {tool.name for tool in (await client.list_tools()).tools} == TOOLS
        job = await call(client, "submit_build", target="count", args=["5"])
        result = await asyncio.wait_for(client.call_tool(
            "status", {"id": job["id"], "stream": True}, progress_callback=on_progress), 20)
        assert result.structured_content["state"]["status"] == "completed"
        assert progress and progress == sorted(set(progress))
        assert "no job j999" in await call_error(client, "status", id="j999")
        assert "unknown target" in await call_error(client, "submit_build", target="nope")
        logs = await call(client, "logs", id=job["id"], lines=2)
        assert logs["text"] == "::progress 5/5 step 5\n── completed ──\n"
        [here] = (await call(client, "workers"))["workers"]
        assert here["id"] == svc.app.queue.owner and here["running"] == []
        assert "no job j999" in await call_error(client, "logs", id="j999")


@pytest.mark.parametrize("mode", MODES)
async def test_stopping_the_service_answers_streaming_calls_at_once(tmp_path, mode):
    config = make_config(tmp_path, targets=TARGETS, api={"token": TOKEN})
    app = build_service(config)
    await app.start()
    service = Service(app)
    job = await app.submit("slow")

    answers: list[Any] = []

    async def watch() -> None:
        # Closing the session afterwards fails (the service is gone); the answer counts.
        with contextlib.suppress(Exception):
            async with Client(http_transport(service), mode=mode) as client:
                answers.append(
                    await client.call_tool("status", {"id": job.id, "stream": True}))

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.8)
    started = time.monotonic()
    await app.stop()
    stop_took = time.monotonic() - started
    await asyncio.wait_for(watcher, 10)
    [result] = answers
    assert stop_took < 3.0, stop_took
    assert not result.is_error
    assert result.structured_content["endedBy"] == "shutdown"
    assert result.structured_content["state"]["status"] == "processing"

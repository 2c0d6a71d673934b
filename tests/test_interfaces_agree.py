"""The HTTP stream, the CLI and MCP show the same live state for the same job."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fleet import node_config, start
from helpers import make_config, python_target
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from matrixjobs.api import ApiServer
from matrixjobs.app import App
from matrixjobs.service import build_service

TOKEN = "agree-token"
# Steps once, then waits for the file it is given before the rest: every watcher has
# attached by then, however slowly a loaded machine starts the CLI. (The file is outside
# /tmp, which a contained job sees as its own.)
STEPS = python_target("""
    import os, sys, time
    print("::progress 1/40 step 1", flush=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
        time.sleep(0.02)
    for step in range(2, 41):
        time.sleep(0.05)
        print(f"::progress {step}/40 step {step}", flush=True)
""", args_pattern="/var/tmp/[a-z0-9_/]+")


@pytest.fixture
def go() -> Iterator[Path]:
    """Where the test says "go on" to STEPS."""
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="agree_") as directory:
        yield Path(directory) / "go"


async def api_stream(url: str, job_id: str, attached: asyncio.Event) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    events = []
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http, http.stream(
            "GET", f"{url}/v1/status/{job_id}", params={"stream": "true"}) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        async for line in response.aiter_lines():
            if line:
                events.append(json.loads(line))
                attached.set()
    return events


async def cli_watch(url: str, job_id: str, attached: asyncio.Event) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MATRIXJOBS_")}
    env.update(MATRIXJOBS_API_URL=url, MATRIXJOBS_API_TOKEN=TOKEN)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "matrixjobs", "status", job_id, "--watch", "--json", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    events = []
    async with asyncio.timeout(30):
        async for line in process.stdout:
            if line.strip():
                events.append(json.loads(line))
                attached.set()
        err = await process.stderr.read()
        assert await process.wait() == 0, err.decode()
    return events


async def mcp_stream(url: str, job_id: str, attached: asyncio.Event
                     ) -> tuple[dict[str, Any], list[float]]:
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)
        attached.set()

    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"},
                              timeout=httpx2.Timeout(30.0, read=120.0))
    async with Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client:
        result = await client.call_tool("status", {"id": job_id, "stream": True},
                                        progress_callback=on_progress)
    assert not result.is_error and result.structured_content is not None
    return result.structured_content["state"], progress


def percentages(events: list[dict[str, Any]]) -> list[float]:
    return [e["progress"]["percentage"] for e in events if e.get("progress")]


async def test_stream_cli_and_mcp_agree_on_one_job(tmp_path, go):
    config = make_config(tmp_path, targets={"steps": STEPS},
                         api={"listen": "127.0.0.1:0", "token": TOKEN})
    await agree(build_service(config), go)


async def test_they_agree_on_a_job_that_a_separate_worker_process_runs(tmp_path, pg_url, go):
    """The service runs no jobs (workers = 0): a `matrixjobs worker` process does, and its
    progress reaches the service's stream, the CLI and MCP through the shared store."""
    config = make_config(tmp_path, targets={"steps": STEPS}, queue={"workers": 0},
                         store={"backend": "postgresql", "url": pg_url},
                         api={"listen": "127.0.0.1:0", "token": TOKEN})
    worker = start(tmp_path / "w1", node_config(tmp_path / "w1", pg_url, {"steps": STEPS},
                                                name="w1"), "worker", "w1")
    try:
        finals = await agree(build_service(config), go)
    finally:
        worker.stop()
    assert {final["worker"] for final in finals} == {"w1"}


async def agree(app: App, go: Path) -> list[dict[str, Any]]:
    await app.start()
    try:
        [api] = [c for c in app.components if isinstance(c, ApiServer)]
        job = await app.submit("steps", [str(go)])
        attached = [asyncio.Event() for _ in range(3)]

        async def go_on() -> None:
            async with asyncio.timeout(30):
                for watcher in attached:
                    await watcher.wait()
            go.touch()
        streamed, watched, (mcp_final, mcp_progress), _ = await asyncio.gather(
            api_stream(api.url, job.id, attached[0]), cli_watch(api.url, job.id, attached[1]),
            mcp_stream(api.url, job.id, attached[2]), go_on())
        stored = (await app.status(job.id)).model_dump(mode="json", by_alias=True,
                                                      exclude_none=True)
    finally:
        await app.stop()

    finals = [streamed[-1], watched[-1], mcp_final]
    for final in finals:
        assert final["id"] == job.id and final["status"] == "completed"
        assert final["progress"] == {"current": 40.0, "total": 40.0, "percentage": 100.0}
        assert final["finishedAt"] == stored["finishedAt"]
        assert final["message"] == "step 40"
    for events in (streamed, watched):
        assert percentages(events) == sorted(percentages(events))
        assert len(events) >= 3  # live updates, not just the end
    assert mcp_progress == sorted(set(mcp_progress)) and len(mcp_progress) >= 2
    return finals

"""The HTTP stream, the CLI and MCP show the same live state for the same job."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import httpx2
from fleet import node_config, start
from helpers import make_config, python_target
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from matrixjobs.api import ApiServer
from matrixjobs.app import App
from matrixjobs.service import build_service

TOKEN = "agree-token"
STEPS = python_target("""
    import time
    for step in range(1, 41):
        time.sleep(0.05)
        print(f"::progress {step}/40 step {step}", flush=True)
""")


async def api_stream(url: str, job_id: str) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http, http.stream(
            "GET", f"{url}/v1/status/{job_id}", params={"stream": "true"}) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) async for line in response.aiter_lines() if line]


async def cli_watch(url: str, job_id: str) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MATRIXJOBS_")}
    env.update(MATRIXJOBS_API_URL=url, MATRIXJOBS_API_TOKEN=TOKEN)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "matrixjobs", "status", job_id, "--watch", "--json", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


async def mcp_stream(url: str, job_id: str) -> tuple[dict[str, Any], list[float]]:
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"},
                              timeout=httpx2.Timeout(30.0, read=120.0))
    async with Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client:
        result = await client.call_tool("status", {"id": job_id, "stream": True},
                                        progress_callback=on_progress)
    assert not result.is_error and result.structured_content is not None
    return result.structured_content["state"], progress


def percentages(events: list[dict[str, Any]]) -> list[float]:
    return [e["progress"]["percentage"] for e in events if e.get("progress")]


async def test_stream_cli_and_mcp_agree_on_one_job(tmp_path):
    config = make_config(tmp_path, targets={"steps": STEPS},
                         api={"listen": "127.0.0.1:0", "token": TOKEN})
    await agree(build_service(config))


async def test_they_agree_on_a_job_that_a_separate_worker_process_runs(tmp_path, pg_url):
    """The service runs no jobs (workers = 0): a `matrixjobs worker` process does, and its
    progress reaches the service's stream, the CLI and MCP through the shared store."""
    config = make_config(tmp_path, targets={"steps": STEPS}, queue={"workers": 0},
                         store={"backend": "postgresql", "url": pg_url},
                         api={"listen": "127.0.0.1:0", "token": TOKEN})
    worker = start(tmp_path / "w1", node_config(tmp_path / "w1", pg_url, {"steps": STEPS},
                                                name="w1"), "worker", "w1")
    try:
        finals = await agree(build_service(config))
    finally:
        worker.stop()
    assert {final["worker"] for final in finals} == {"w1"}


async def agree(app: App) -> list[dict[str, Any]]:
    await app.start()
    try:
        [api] = [c for c in app.components if isinstance(c, ApiServer)]
        job = await app.submit("steps")
        streamed, watched, (mcp_final, mcp_progress) = await asyncio.gather(
            api_stream(api.url, job.id), cli_watch(api.url, job.id),
            mcp_stream(api.url, job.id))
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

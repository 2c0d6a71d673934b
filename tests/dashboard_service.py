"""A running service for the dashboard tests (import as `from dashboard_service import …`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
from helpers import SLOW_TARGET, counting_target, make_config, python_target

from matrixjobs.api import ApiServer
from matrixjobs.app import App
from matrixjobs.service import build_service

TOKEN = "dash-token-9f3a"
TARGETS = {
    "count": counting_target(0.05),
    "slow": SLOW_TARGET,
    "quick": python_target("print('built the docs')"),
    # Never reports progress: its elapsed time must move all the same.
    "quiet": python_target("import time; time.sleep(30)"),
}


class Service:
    def __init__(self, app: App) -> None:
        self.app = app
        [self.api] = [c for c in app.components if isinstance(c, ApiServer)]

    @property
    def url(self) -> str:
        return self.api.url

    def client(self, token: str | None = None, **kwargs: Any) -> httpx2.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx2.AsyncClient(base_url=self.url, headers=headers, timeout=20.0, **kwargs)

    async def submit(self, target: str, *args: str, token: str | None = TOKEN,
                     agent: str | None = None) -> str:
        headers = {"User-Agent": agent} if agent else {}
        async with self.client(token) as client:
            response = await client.post("/v1/jobs", json={"target": target, "args": list(args)},
                                         headers=headers)
        assert response.status_code == 201, response.text
        return response.json()["id"]


@asynccontextmanager
async def running(tmp_path: Path, **sections: Any) -> AsyncIterator[Service]:
    sections.setdefault("targets", TARGETS)
    app = build_service(make_config(tmp_path, **sections))
    try:
        await app.start()
        yield Service(app)
    finally:
        await app.stop()


async def sse_messages(response: httpx2.Response) -> AsyncIterator[tuple[str, Any]]:
    """(event name, parsed data) per server-sent event; ("comment", text) for comments."""
    kind, data = "message", []
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield "comment", line[1:].strip()
        elif line.startswith("event:"):
            kind = line.partition(":")[2].strip()
        elif line.startswith("data:"):
            data.append(line.partition(":")[2].strip())
        elif not line and data:
            yield kind, json.loads("\n".join(data))
            kind, data = "message", []

"""What the MCP tools need from matrixjobs, and two ways to get it.

`AppBackend` calls the core (`App`) in the service's own process (MCP over
streamable HTTP at /mcp); `HttpBackend` talks to a running service through
its HTTP API (`matrixjobs mcp`, the stdio transport). Both raise
`MatrixJobsError` with a message meant for people; the tools turn it into an
MCP tool error.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol
from urllib.parse import quote

import httpx2

from matrixjobs.app import App
from matrixjobs.errors import MatrixJobsError, NotFoundError
from matrixjobs.models import Batch, Job, Status
from matrixjobs.progress.events import JobProgressEvent, batch_event, job_event


class Backend(Protocol):
    async def status(self, subject: str) -> JobProgressEvent: ...

    def watch(self, subject: str) -> AsyncIterator[JobProgressEvent]:
        """The current state, then every update, ending with the terminal one."""
        ...

    async def submit(self, target: str, args: Sequence[str]) -> JobProgressEvent: ...

    async def submit_batch(self, targets: Sequence[str]) -> JobProgressEvent: ...

    async def cancel(self, subject: str) -> JobProgressEvent: ...

    async def jobs(self, statuses: Sequence[Status] | None, limit: int) -> list[JobProgressEvent]:
        ...

    async def batches(
        self, statuses: Sequence[Status] | None, limit: int
    ) -> list[JobProgressEvent]: ...


def event_of(item: Job | Batch) -> JobProgressEvent:
    if isinstance(item, Batch):
        return batch_event(item, time.time())
    return job_event(item, time.time())


class AppBackend:
    """The core in this process."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def status(self, subject: str) -> JobProgressEvent:
        return await self.app.status(subject)

    def watch(self, subject: str) -> AsyncIterator[JobProgressEvent]:
        return self.app.watch(subject)

    async def submit(self, target: str, args: Sequence[str]) -> JobProgressEvent:
        return self.live(await self.app.submit(target, args))

    async def submit_batch(self, targets: Sequence[str]) -> JobProgressEvent:
        return self.live(await self.app.submit_batch(targets))

    async def cancel(self, subject: str) -> JobProgressEvent:
        return event_of(await self.app.cancel(subject))

    async def jobs(self, statuses: Sequence[Status] | None, limit: int) -> list[JobProgressEvent]:
        return [self.live(job) for job in await self.app.jobs(statuses, limit)]

    async def batches(
        self, statuses: Sequence[Status] | None, limit: int
    ) -> list[JobProgressEvent]:
        return [self.live(batch) for batch in await self.app.batches(statuses, limit)]

    def live(self, item: Job | Batch) -> JobProgressEvent:
        return self.app.monitor.current(item.id) or event_of(item)


class HttpBackend:
    """A running service, through its HTTP API (`/v1/...`)."""

    def __init__(self, base_url: str, token: str | None = None,
                 client: httpx2.AsyncClient | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        transport = None
        if base_url.startswith("unix:"):  # the service's unix socket
            transport = httpx2.AsyncHTTPTransport(uds=base_url.removeprefix("unix:"))
            base_url = "http://localhost"
        self.client = client or httpx2.AsyncClient(
            base_url=base_url, headers=headers, transport=transport,
            timeout=httpx2.Timeout(30.0, read=None),  # streams may stay quiet for long
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def status(self, subject: str) -> JobProgressEvent:
        return JobProgressEvent.model_validate(await self._call("GET", _status_path(subject)))

    async def watch(self, subject: str) -> AsyncIterator[JobProgressEvent]:
        try:
            async with self.client.stream(
                "GET", _status_path(subject), params={"stream": "true"}
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _error(response)
                async for line in response.aiter_lines():
                    if line.strip():
                        yield JobProgressEvent.model_validate_json(line)
        except httpx2.TransportError as exc:
            raise self._unreachable(exc) from None

    async def submit(self, target: str, args: Sequence[str]) -> JobProgressEvent:
        body = {"target": target, "args": list(args)}
        return JobProgressEvent.model_validate(await self._call("POST", "/v1/jobs", body))

    async def submit_batch(self, targets: Sequence[str]) -> JobProgressEvent:
        body = {"targets": list(targets)}
        return JobProgressEvent.model_validate(await self._call("POST", "/v1/batches", body))

    async def cancel(self, subject: str) -> JobProgressEvent:
        kind = "batches" if subject.strip().lower().startswith("b") else "jobs"
        path = f"/v1/{kind}/{quote(subject.strip(), safe='')}/cancel"
        return JobProgressEvent.model_validate(await self._call("POST", path))

    async def jobs(self, statuses: Sequence[Status] | None, limit: int) -> list[JobProgressEvent]:
        return await self._list("jobs", statuses, limit)

    async def batches(
        self, statuses: Sequence[Status] | None, limit: int
    ) -> list[JobProgressEvent]:
        return await self._list("batches", statuses, limit)

    async def _list(
        self, key: str, statuses: Sequence[Status] | None, limit: int
    ) -> list[JobProgressEvent]:
        params: dict[str, str] = {"limit": str(limit)}
        if statuses:
            params["status"] = ",".join(status.value for status in statuses)
        data = await self._call("GET", f"/v1/{key}", params=params)
        return [JobProgressEvent.model_validate(item) for item in data[key]]

    async def _call(self, method: str, path: str, body: object = None,
                    params: dict[str, str] | None = None) -> Any:
        try:
            response = await self.client.request(method, path, json=body, params=params)
        except httpx2.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise _error(response)
        return response.json()

    def _unreachable(self, exc: Exception) -> MatrixJobsError:
        return MatrixJobsError(
            f"cannot reach the matrixjobs service at {self.base_url}: {exc or type(exc).__name__}")


def _status_path(subject: str) -> str:
    return f"/v1/status/{quote(subject.strip(), safe='')}"


def _error(response: httpx2.Response) -> MatrixJobsError:
    try:
        message = str(json.loads(response.content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = f"the service answered HTTP {response.status_code}"
    if response.status_code == 404:
        return NotFoundError(message)
    return MatrixJobsError(message)

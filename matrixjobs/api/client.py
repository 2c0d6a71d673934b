"""A small async client for the service's HTTP API (/v1/...), built on httpx2: used by the
CLI and by `matrixjobs mcp` (stdio)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx2

from matrixjobs import __version__
from matrixjobs.fleet import WorkerState
from matrixjobs.models import BATCH_PREFIX, parse_id
from matrixjobs.progress.events import JobProgressEvent
from matrixjobs.schedules import ScheduleInfo

DEFAULT_URL = "http://127.0.0.1:8765"
URL_ENV = "MATRIXJOBS_API_URL"
TOKEN_ENV = "MATRIXJOBS_API_TOKEN"
UNIX_PREFIX = "unix:"
USER_AGENT_PREFIX = "matrixjobs-"


class ServiceUnreachable(Exception):
    """The service could not be reached (not running, wrong address, connection dropped)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the matrixjobs service at {url}: {reason}")
        self.url = url


class ApiFailure(Exception):
    """The service answered with an error: `{"error": {"code": ..., "message": ...}}`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def describe(self) -> str:
        if self.status == 401:
            return (f"the service refused the API token ({self.message}); "
                    f"set {TOKEN_ENV} to the service's token")
        if self.status == 403:
            return f"the service refused the request: {self.message}"
        return self.message


@dataclass(frozen=True, slots=True)
class Overview:
    """What `GET /v1/status` answers."""

    active: list[JobProgressEvent]
    degraded: str | None  # while the store cannot take writes, why ("store: locked")


def user_agent(client: str) -> str:
    return f"{USER_AGENT_PREFIX}{client}/{__version__}"


def default_url() -> str:
    return os.environ.get(URL_ENV) or DEFAULT_URL


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ApiClient:
    """`async with ApiClient(url, token) as api: await api.jobs()`."""

    def __init__(self, url: str | None = None, token: str | None = None,
                 client: str = "cli") -> None:
        """`client` names the program ("cli", "mcp"): the service records it as the
        requester of what is submitted."""
        self.url = (url or default_url()).rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        base = self.url
        transport = None
        if self.url.startswith(UNIX_PREFIX):
            transport = httpx2.AsyncHTTPTransport(uds=self.url[len(UNIX_PREFIX):])
            base = "http://localhost"
        headers = {"User-Agent": user_agent(client)}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self._http = httpx2.AsyncClient(
            base_url=base, headers=headers, transport=transport,
            timeout=httpx2.Timeout(30.0, connect=5.0),
        )

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- endpoints --------------------------------------------------------------------------

    async def jobs(self, status: str | None = None, limit: int = 50) -> list[JobProgressEvent]:
        return await self._list("/v1/jobs", "jobs", status, limit)

    async def batches(
        self, status: str | None = None, limit: int = 50
    ) -> list[JobProgressEvent]:
        return await self._list("/v1/batches", "batches", status, limit)

    async def active(self) -> list[JobProgressEvent]:
        """Queued and running batches, then jobs outside a batch."""
        return (await self.overview()).active

    async def overview(self) -> Overview:
        """What is active, and whether the store is in trouble."""
        data = await self._request("GET", "/v1/status")
        degraded = data.get("degraded")
        return Overview([JobProgressEvent.model_validate(item) for item in data["active"]],
                        degraded if isinstance(degraded, str) else None)

    async def status(self, subject: str) -> JobProgressEvent:
        return event_from(await self._request("GET", f"/v1/status/{_segment(subject)}"))

    async def workers(self) -> list[WorkerState]:
        """Every worker of the service's store, silent ones too."""
        data = await self._request("GET", "/v1/workers")
        return [WorkerState.model_validate(item) for item in data["workers"]]

    async def schedules(self) -> list[ScheduleInfo]:
        data = await self._request("GET", "/v1/schedules")
        return [ScheduleInfo.model_validate(item) for item in data["schedules"]]

    async def pause_schedule(self, name: str, pause: bool) -> ScheduleInfo:
        """Pause (or with `pause` false, resume) a schedule."""
        action = "pause" if pause else "resume"
        data = await self._request("POST", f"/v1/schedules/{_segment(name)}/{action}")
        return ScheduleInfo.model_validate(data)

    async def audit(self, params: dict[str, str]) -> list[dict[str, Any]]:
        """Audit records (GET /v1/audit's query `params`), oldest first."""
        data = await self._request("GET", "/v1/audit", params=params)
        return list(data["records"])

    async def tokens(self) -> list[dict[str, Any]]:
        return list((await self._request("GET", "/v1/tokens"))["tokens"])

    async def issue_token(self, user: str | None, name: str) -> dict[str, Any]:
        body = {"name": name, **({"user": user} if user else {})}
        return dict(await self._request("POST", "/v1/tokens", body))

    async def revoke_token(self, user: str | None, name: str) -> dict[str, Any]:
        return dict(await self._request("DELETE", f"/v1/tokens/{_segment(name)}",
                                        params={"user": user} if user else None))

    async def verify_audit(self) -> dict[str, Any]:
        return dict(await self._request("GET", "/v1/audit/verify", timeout=120.0))

    async def submit(self, target: str, args: list[str]) -> JobProgressEvent:
        body = {"target": target, "args": args}
        return event_from(await self._request("POST", "/v1/jobs", body))

    async def submit_batch(self, targets: list[str]) -> JobProgressEvent:
        return event_from(await self._request("POST", "/v1/batches", {"targets": targets}))

    async def rerun(self, subject: str) -> JobProgressEvent:
        return event_from(await self._request("POST", f"{_path_of(subject)}/rerun"))

    async def approve(self, subject: str) -> JobProgressEvent:
        return event_from(await self._request("POST", f"{_path_of(subject)}/approve"))

    async def deny(self, subject: str, reason: str | None) -> JobProgressEvent:
        body = {"reason": reason} if reason else {}
        return event_from(await self._request("POST", f"{_path_of(subject)}/deny", body,
                                              timeout=120.0))

    async def cancel(self, subject: str) -> JobProgressEvent:
        # Cancelling answers once the job stopped (SIGTERM, grace period, SIGKILL).
        return event_from(
            await self._request("POST", f"{_path_of(subject)}/cancel", timeout=120.0)
        )

    async def stream(self, subject: str) -> AsyncIterator[JobProgressEvent]:
        """The NDJSON stream of `subject`: current state, updates, terminal state."""
        try:
            async with self._http.stream(
                "GET", f"/v1/status/{_segment(subject)}", params={"stream": "true"},
                timeout=httpx2.Timeout(None, connect=5.0),
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise failure(response)
                async for line in response.aiter_lines():
                    if line.strip():
                        yield JobProgressEvent.model_validate_json(line)
        except httpx2.TransportError as exc:
            raise ServiceUnreachable(self.url, describe_error(exc)) from None

    async def log(self, job_id: str, follow: bool = False) -> AsyncIterator[str]:
        """A job's log as text, in pieces; with `follow`, until its run ends."""
        params = {"follow": "true"} if follow else None
        try:
            async with self._http.stream(
                "GET", f"/v1/jobs/{_segment(job_id)}/log", params=params,
                timeout=httpx2.Timeout(None if follow else 30.0, connect=5.0),
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise failure(response)
                async for text in response.aiter_text():
                    yield text
        except httpx2.TransportError as exc:
            raise ServiceUnreachable(self.url, describe_error(exc)) from None

    # -- plumbing ---------------------------------------------------------------------------

    async def _list(
        self, path: str, key: str, status: str | None, limit: int
    ) -> list[JobProgressEvent]:
        params: dict[str, str] = {"limit": str(limit)}
        if status:
            params["status"] = status
        data = await self._request("GET", path, params=params)
        return [JobProgressEvent.model_validate(item) for item in data[key]]

    async def _request(
        self, method: str, path: str, body: Any = None, *,
        params: dict[str, str] | None = None, timeout: float | None = None,
    ) -> Any:
        extra: dict[str, Any] = {}
        if timeout is not None:
            extra["timeout"] = httpx2.Timeout(timeout, connect=5.0)
        try:
            response = await self._http.request(
                method, path, json=body, params=params, **extra
            )
        except httpx2.TransportError as exc:
            raise ServiceUnreachable(self.url, describe_error(exc)) from None
        if response.status_code >= 400:
            raise failure(response)
        return response.json()


def event_from(data: Any) -> JobProgressEvent:
    return JobProgressEvent.model_validate(data)


def failure(response: httpx2.Response) -> ApiFailure:
    try:
        error = json.loads(response.content)["error"]
        return ApiFailure(response.status_code, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:200] or response.reason_phrase
        status = response.status_code
        return ApiFailure(status, "http_error", f"HTTP {status}: {text}")


def _path_of(subject: str) -> str:
    """/v1/batches/b3 for a batch id, else /v1/jobs/… (which answers 404 for a non-id)."""
    parsed = parse_id(subject)
    kind = "batches" if parsed is not None and parsed[0] == BATCH_PREFIX else "jobs"
    return f"/v1/{kind}/{_segment(subject)}"


def _segment(subject: str) -> str:
    """An id as one URL path segment: `j1/../b2` must name no other job."""
    return quote(subject.strip(), safe="")

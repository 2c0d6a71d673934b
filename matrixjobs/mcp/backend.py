"""What the MCP tools need from matrixjobs, and two ways to get it.

`AppBackend` calls the core (`App`) in the service's own process (MCP over
streamable HTTP at /mcp); `HttpBackend` talks to a running service through
its HTTP API (`matrixjobs mcp`, the stdio transport). Both raise
`MatrixJobsError` with a message meant for people; the tools turn it into an
MCP tool error.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

from matrixjobs.api.client import ApiClient, ApiFailure, ServiceUnreachable
from matrixjobs.app import App
from matrixjobs.errors import MatrixJobsError, NotFoundError
from matrixjobs.fleet import WorkerState, worker_state
from matrixjobs.models import Status
from matrixjobs.policy import ADMIN, Caller, Via
from matrixjobs.progress.events import JobProgressEvent, event_of
from matrixjobs.queue.joblog import tail
from matrixjobs.schedules import ScheduleInfo

T = TypeVar("T")


class Backend(Protocol):
    async def status(self, subject: str) -> JobProgressEvent: ...

    def watch(self, subject: str) -> AsyncIterator[JobProgressEvent]:
        """The current state, then every update, ending with the terminal one."""
        ...

    async def submit(self, target: str, args: Sequence[str]) -> JobProgressEvent: ...

    async def submit_batch(self, targets: Sequence[str]) -> JobProgressEvent: ...

    async def rerun(self, subject: str) -> JobProgressEvent: ...

    async def cancel(self, subject: str) -> JobProgressEvent: ...

    async def approve(self, subject: str) -> JobProgressEvent: ...

    async def deny(self, subject: str, reason: str | None) -> JobProgressEvent: ...

    async def active(self) -> list[JobProgressEvent]:
        """Queued and running batches, then jobs outside a batch."""
        ...

    async def jobs(self, statuses: Sequence[Status] | None, limit: int) -> list[JobProgressEvent]:
        ...

    async def batches(
        self, statuses: Sequence[Status] | None, limit: int
    ) -> list[JobProgressEvent]: ...

    async def log_tail(self, job_id: str, lines: int, max_bytes: int) -> str:
        """The last `lines` lines of a job's log, at most `max_bytes` of them."""
        ...

    async def workers(self) -> list[WorkerState]:
        """Every worker of the store, silent ones too."""
        ...

    async def schedules(self) -> list[ScheduleInfo]: ...

    async def pause_schedule(self, name: str, pause: bool) -> ScheduleInfo:
        """Pause (or with `pause` false, resume) a schedule."""
        ...


# The service token's holder using MCP in this process.
MCP_ADMIN = Caller(ADMIN, Via.MCP)


def _the_service() -> Caller:
    return MCP_ADMIN


class AppBackend:
    """The core in this process, acting for whoever `caller()` names at each call (over
    HTTP: the person whose token carried the request; see mcp/http.py)."""

    def __init__(self, app: App, caller: Callable[[], Caller] = _the_service) -> None:
        self.app = app
        self.caller = caller

    async def status(self, subject: str) -> JobProgressEvent:
        return await self.app.status(subject)

    def watch(self, subject: str) -> AsyncIterator[JobProgressEvent]:
        return self.app.watch(subject)

    async def submit(self, target: str, args: Sequence[str]) -> JobProgressEvent:
        return self.app.live(await self.app.submit(target, args, caller=self.caller()))

    async def submit_batch(self, targets: Sequence[str]) -> JobProgressEvent:
        return self.app.live(await self.app.submit_batch(targets, caller=self.caller()))

    async def rerun(self, subject: str) -> JobProgressEvent:
        return self.app.live(await self.app.rerun(subject, caller=self.caller()))

    async def cancel(self, subject: str) -> JobProgressEvent:
        return event_of(await self.app.cancel(subject, self.caller()), time.time())

    async def approve(self, subject: str) -> JobProgressEvent:
        return self.app.live(await self.app.approve(subject, self.caller()))

    async def deny(self, subject: str, reason: str | None) -> JobProgressEvent:
        return self.app.live(await self.app.deny(subject, self.caller(), reason))

    async def active(self) -> list[JobProgressEvent]:
        return await self.app.active()

    async def jobs(self, statuses: Sequence[Status] | None, limit: int) -> list[JobProgressEvent]:
        return [self.app.live(job) for job in await self.app.jobs(statuses, limit)]

    async def batches(
        self, statuses: Sequence[Status] | None, limit: int
    ) -> list[JobProgressEvent]:
        return [self.app.live(batch) for batch in await self.app.batches(statuses, limit)]

    async def log_tail(self, job_id: str, lines: int, max_bytes: int) -> str:
        return await self.app.log_tail(job_id, lines, max_bytes, self.caller())

    async def workers(self) -> list[WorkerState]:
        now, lease_s = time.time(), self.app.config.queue.lease_s
        return [worker_state(worker, now, lease_s) for worker in await self.app.workers()]

    async def schedules(self) -> list[ScheduleInfo]:
        return await self.app.schedules()

    async def pause_schedule(self, name: str, pause: bool) -> ScheduleInfo:
        change = self.app.pause_schedule if pause else self.app.resume_schedule
        return await change(name, self.caller())


class HttpBackend:
    """A running service, through its HTTP API (the same client as the CLI's)."""

    def __init__(self, base_url: str, token: str | None = None) -> None:
        self.api = ApiClient(base_url, token, client="mcp")

    async def aclose(self) -> None:
        await self.api.aclose()

    async def status(self, subject: str) -> JobProgressEvent:
        return await _translated(self.api.status(subject))

    async def watch(self, subject: str) -> AsyncIterator[JobProgressEvent]:
        try:
            async for event in self.api.stream(subject):
                yield event
        except (ApiFailure, ServiceUnreachable) as exc:
            raise _error(exc) from None

    async def submit(self, target: str, args: Sequence[str]) -> JobProgressEvent:
        return await _translated(self.api.submit(target, list(args)))

    async def submit_batch(self, targets: Sequence[str]) -> JobProgressEvent:
        return await _translated(self.api.submit_batch(list(targets)))

    async def rerun(self, subject: str) -> JobProgressEvent:
        return await _translated(self.api.rerun(subject))

    async def cancel(self, subject: str) -> JobProgressEvent:
        return await _translated(self.api.cancel(subject))

    async def approve(self, subject: str) -> JobProgressEvent:
        return await _translated(self.api.approve(subject))

    async def deny(self, subject: str, reason: str | None) -> JobProgressEvent:
        return await _translated(self.api.deny(subject, reason))

    async def active(self) -> list[JobProgressEvent]:
        return await _translated(self.api.active())

    async def jobs(self, statuses: Sequence[Status] | None, limit: int) -> list[JobProgressEvent]:
        return await _translated(self.api.jobs(_statuses(statuses), limit))

    async def batches(
        self, statuses: Sequence[Status] | None, limit: int
    ) -> list[JobProgressEvent]:
        return await _translated(self.api.batches(_statuses(statuses), limit))

    async def log_tail(self, job_id: str, lines: int, max_bytes: int) -> str:
        # The API gives the whole log (at most [logs] max_bytes); the tail is cut here.
        try:
            text = "".join([piece async for piece in self.api.log(job_id)])
        except (ApiFailure, ServiceUnreachable) as exc:
            raise _error(exc) from None
        return tail(text, lines, max_bytes)

    async def workers(self) -> list[WorkerState]:
        return await _translated(self.api.workers())

    async def schedules(self) -> list[ScheduleInfo]:
        return await _translated(self.api.schedules())

    async def pause_schedule(self, name: str, pause: bool) -> ScheduleInfo:
        return await _translated(self.api.pause_schedule(name, pause))


def _statuses(statuses: Sequence[Status] | None) -> str | None:
    return ",".join(status.value for status in statuses) if statuses else None


async def _translated(call: Awaitable[T]) -> T:
    try:
        return await call
    except (ApiFailure, ServiceUnreachable) as exc:
        raise _error(exc) from None


def _error(exc: ApiFailure | ServiceUnreachable) -> MatrixJobsError:
    """The client's errors as the core's, which the tools turn into MCP tool errors."""
    if isinstance(exc, ApiFailure) and exc.status == 404:
        return NotFoundError(exc.message)
    return MatrixJobsError(exc.message if isinstance(exc, ApiFailure) else str(exc))

"""The MCP server: twelve tools over a `Backend` (the core in-process, or the HTTP API).

Tools: `status` (optionally streaming progress), `list_jobs`, `submit_build`,
`submit_batch`, `rerun`, `cancel`, `approve` and `deny` (work held for approval), `logs`
(the end of a job's output), `workers` (the fleet), `schedules` and `pause_schedule`.
Results are pydantic models, so
clients get `structuredContent` (camelCase, the same `job-progress` JSON as the HTTP API)
beside the text.

Streaming `status` (stream=true, with an id): every job-progress event of that
job or batch becomes an MCP progress notification when the client sent a
progress token. `progress` is the notification's sequence number (1, 2, 3, …:
it must increase with every notification, and a job's own percentage can stay
put or, across retries, go back), so `total` is always None; the job's own
numbers are in `message` ("j3 processing 45% (9/20): step 9"). When no event came
for HEARTBEAT_S, a heartbeat notification repeats the last state, so clients
with per-request timeouts of a minute stay alive. The call returns the final
state when the job/batch ends, or the current state when `max_wait_s` passes
(call again to keep following). Cancelling the call only stops the watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from matrixjobs import __version__
from matrixjobs.errors import MatrixJobsError
from matrixjobs.fleet import WorkerState
from matrixjobs.mcp.backend import Backend
from matrixjobs.models import Status
from matrixjobs.progress import wording
from matrixjobs.progress.events import CamelModel, JobProgressEvent
from matrixjobs.schedules import ScheduleInfo

HEARTBEAT_S = 50.0
MAX_LIMIT = 1000
DEFAULT_LOG_LINES = 100
MAX_LOG_LINES = 2000
# Enough to read a failure, small enough for a model's context.
MAX_LOG_BYTES = 32 * 1024

INSTRUCTIONS = """\
matrixjobs runs configured build targets as queued jobs and reports their progress.
Submit with submit_build (one target) or submit_batch (several); follow a job or batch
with status(id, stream=true), which sends progress notifications and returns when it ends
(set max_wait_s if your client times out requests, then call again). Ids look like j12
(jobs) and b3 (batches). rerun(id) runs a job or batch again with the same arguments.
Work whose state has `approval` waiting waits for people: approve(id) or deny(id, reason).
schedules lists the work that starts itself; pause_schedule(name, paused) holds or resumes
one."""


class StatusResult(CamelModel):
    """`status` for one id (`state`), or without an id the active jobs and batches."""

    id: str | None = None
    state: JobProgressEvent | None = None
    terminal: bool | None = None
    ended_by: Literal["now", "finished", "max_wait", "shutdown"] | None = None
    notifications: int = 0
    active: list[JobProgressEvent] | None = None


class LogResult(CamelModel):
    """The end of a job's log: its last `lines` lines, at most MAX_LOG_BYTES."""

    id: str
    text: str
    lines: int


class WorkerList(CamelModel):
    workers: list[WorkerState]


class ScheduleList(CamelModel):
    schedules: list[ScheduleInfo]


class JobList(CamelModel):
    jobs: list[JobProgressEvent]
    batches: list[JobProgressEvent]


def describe(event: JobProgressEvent) -> str:
    """One line for a progress notification: "j3 processing 45% (9/20): step 9"."""
    parts = [event.id, event.status.value, wording.shown_percent(event)]
    if counts := wording.counts(event):
        parts.append(f"({counts})")
    if event.batch_details is not None and event.batch_details.failed_operations:
        parts.append(f"[{event.batch_details.failed_operations} failed]")
    text = " ".join(part for part in parts if part)
    detail = event.message or event.error
    if event.batch_details is not None and event.batch_details.current_operation:
        detail = detail or event.batch_details.current_operation
    return f"{text}: {detail}" if detail else text


def build_mcp_server(
    backend: Backend, name: str = "matrixjobs", stopping: asyncio.Event | None = None
) -> MCPServer:
    """The MCP server for `backend`; serve it with `McpHttp` or `run_stdio_async()`.

    Setting `stopping` makes streaming `status` calls answer at once (service stop).
    """
    server = MCPServer(name, instructions=INSTRUCTIONS, version=__version__)

    @server.tool(name="status")
    async def status(
        ctx: Context,
        id: Annotated[str | None, Field(
            description="a job (j12) or batch (b3) id; omit for all active jobs and batches",
        )] = None,
        stream: Annotated[bool, Field(
            description="follow the job/batch: progress notifications until it ends",
        )] = False,
        max_wait_s: Annotated[float | None, Field(
            gt=0, le=86400,
            description="with stream: return the current state after this many seconds",
        )] = None,
    ) -> StatusResult:
        """The state of a job or batch; with stream=true, follow it until it ends."""
        if id is None or not id.strip():
            if stream:
                raise ToolError("stream=true needs an id (like j12 or b3)")
            async with errors():
                active = await backend.active()
            return StatusResult(active=active)
        subject = id.strip()
        if not stream:
            async with errors():
                state = await backend.status(subject)
            return StatusResult(id=state.id, state=state, terminal=state.terminal, ended_by="now")
        async with errors():
            return await follow(backend, subject, ctx, max_wait_s, stopping)

    @server.tool(name="list_jobs")
    async def list_jobs(
        status: Annotated[list[Status] | None, Field(
            description="only these statuses (pending, processing, completed, failed, cancelled)",
        )] = None,
        limit: Annotated[int, Field(ge=1, le=MAX_LIMIT, description="most items of each kind")]
        = 50,
    ) -> JobList:
        """Jobs and batches, newest first (active and recent ones)."""
        async with errors():
            return JobList(jobs=await backend.jobs(status, limit),
                           batches=await backend.batches(status, limit))

    @server.tool(name="submit_build")
    async def submit_build(
        target: Annotated[str, Field(min_length=1, description="a configured target name")],
        args: Annotated[list[str] | None, Field(
            description="arguments, if the target allows them")] = None,
    ) -> JobProgressEvent:
        """Queue one configured target; returns the new job (follow it with status)."""
        async with errors():
            return await backend.submit(target, args or [])

    @server.tool(name="submit_batch")
    async def submit_batch(
        targets: Annotated[list[str], Field(min_length=1, description="configured target names")],
    ) -> JobProgressEvent:
        """Queue several targets as one batch; returns the new batch."""
        async with errors():
            return await backend.submit_batch(targets)

    @server.tool(name="rerun")
    async def rerun(
        id: Annotated[str, Field(min_length=1, description="a job (j12) or batch (b3) id")],
    ) -> JobProgressEvent:
        """Run a job's target (or a batch's targets) again with the same arguments; returns
        the new job or batch. One operation of a batch reruns alone."""
        async with errors():
            return await backend.rerun(id.strip())

    @server.tool(name="cancel")
    async def cancel(
        id: Annotated[str, Field(min_length=1, description="a job (j12) or batch (b3) id")],
    ) -> JobProgressEvent:
        """Cancel a pending or running job, or every unfinished job of a batch."""
        async with errors():
            return await backend.cancel(id.strip())

    @server.tool(name="approve")
    async def approve(
        id: Annotated[str, Field(min_length=1, description="a job (j12) or batch (b3) id")],
    ) -> JobProgressEvent:
        """Approve a job or batch held for approval (`approval` in its state says how many
        it needs); the last approval needed releases it to run."""
        async with errors():
            return await backend.approve(id.strip())

    @server.tool(name="deny")
    async def deny(
        id: Annotated[str, Field(min_length=1, description="a job (j12) or batch (b3) id")],
        reason: Annotated[str | None, Field(max_length=200,
                                            description="why, shown with it")] = None,
    ) -> JobProgressEvent:
        """Refuse a job or batch held for approval: it is cancelled."""
        async with errors():
            return await backend.deny(id.strip(), reason)

    @server.tool(name="logs")
    async def logs(
        id: Annotated[str, Field(min_length=1, description="a job id (j12)")],
        lines: Annotated[int, Field(
            ge=1, le=MAX_LOG_LINES,
            description=f"how many of the last lines (at most {MAX_LOG_BYTES // 1024} KiB)",
        )] = DEFAULT_LOG_LINES,
    ) -> LogResult:
        """The end of a job's output (stdout and stderr, every attempt), as it stands."""
        async with errors():
            text = await backend.log_tail(id.strip(), lines, MAX_LOG_BYTES)
        return LogResult(id=id.strip(), text=text, lines=text.count("\n"))

    @server.tool(name="workers")
    async def workers() -> WorkerList:
        """The processes that run jobs: labels, running job ids, last heartbeat, and whether
        each is alive or went silent (and for how long)."""
        async with errors():
            return WorkerList(workers=await backend.workers())

    @server.tool(name="schedules")
    async def schedules() -> ScheduleList:
        """The schedules: cron and time zone, what each starts, its next run (in its own
        zone; null while paused), who paused it, and its last job with its status."""
        async with errors():
            return ScheduleList(schedules=await backend.schedules())

    @server.tool(name="pause_schedule")
    async def pause_schedule(
        name: Annotated[str, Field(min_length=1, description="a schedule's name")],
        paused: Annotated[bool, Field(description="true: pause it on every node; false: "
                                                  "resume it from its next slot")] = True,
    ) -> ScheduleInfo:
        """Pause a schedule (its slots start nothing) or resume it (the slots the pause
        held back do not run)."""
        async with errors():
            return await backend.pause_schedule(name.strip(), paused)

    return server


@contextlib.asynccontextmanager
async def errors() -> AsyncIterator[None]:
    """Our errors become MCP tool errors carrying their (people-facing) message."""
    try:
        yield
    except MatrixJobsError as exc:
        raise ToolError(str(exc)) from None


async def follow(
    backend: Backend, subject: str, ctx: Context, max_wait_s: float | None,
    stopping: asyncio.Event | None = None,
) -> StatusResult:
    """Report every event of `subject` as progress until it ends, `max_wait_s` passes or
    the service stops (then the current state is the answer, ended_by "shutdown")."""
    loop = asyncio.get_running_loop()
    deadline = None if max_wait_s is None else loop.time() + max_wait_s
    updates = backend.watch(subject)
    sent = 0
    last: JobProgressEvent | None = None
    next_event: asyncio.Future[JobProgressEvent] = asyncio.ensure_future(anext(updates))
    quiet_since = time.monotonic()
    stop = asyncio.ensure_future((stopping or asyncio.Event()).wait())
    try:
        while True:
            wait = HEARTBEAT_S - (time.monotonic() - quiet_since)
            if deadline is not None:
                wait = min(wait, deadline - loop.time())
            done, _ = await asyncio.wait({next_event, stop}, timeout=max(wait, 0.0),
                                         return_when=asyncio.FIRST_COMPLETED)
            if stop in done:
                state = last or await backend.status(subject)
                return StatusResult(id=state.id, state=state, terminal=state.terminal,
                                    ended_by="shutdown", notifications=sent)
            if not done:
                if deadline is not None and loop.time() >= deadline:
                    state = last or await backend.status(subject)
                    return StatusResult(id=state.id, state=state, terminal=state.terminal,
                                        ended_by="max_wait", notifications=sent)
                if last is not None:  # heartbeat: nothing new for HEARTBEAT_S
                    sent += 1
                    await ctx.report_progress(sent, None, f"{describe(last)} (no change)")
                quiet_since = time.monotonic()
                continue
            try:
                event = next_event.result()
            except StopAsyncIteration:
                break  # the watch ended early (the service behind the API stopping)
            last = event
            sent += 1
            await ctx.report_progress(sent, None, describe(event))
            quiet_since = time.monotonic()
            if event.terminal:
                break
            next_event = asyncio.ensure_future(anext(updates))
    finally:
        stop.cancel()
        # Stop watching, never the job. A pending read is cancelled, which closes the
        # generator inside that task; awaiting it here could hang in a cancelled scope.
        if not next_event.done():
            next_event.cancel()
        else:
            if not next_event.cancelled():
                next_event.exception()  # seen (re-raised above where it matters)
            if isinstance(updates, AsyncGenerator):
                await updates.aclose()
    state = last or await backend.status(subject)
    return StatusResult(id=state.id, state=state, terminal=state.terminal,
                        ended_by="finished" if state.terminal else "shutdown",
                        notifications=sent)

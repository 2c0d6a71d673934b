"""The service: wires config → store → queue and workers → monitor, then the interfaces.

`App` is also the core's public face. Interfaces (Matrix, HTTP API, MCP) get
the App and call `submit`, `submit_batch`, `cancel`, `status`, `watch`, `jobs`
and `batches`; they never reach into the store or queue themselves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Protocol

from matrixjobs.config import Config
from matrixjobs.errors import NotFoundError
from matrixjobs.models import BATCH_PREFIX, Batch, Job, ProgressMessage, Status, parse_id
from matrixjobs.progress.events import JobProgressEvent, event_of
from matrixjobs.progress.monitor import ProgressMonitor
from matrixjobs.queue.command import CommandHandler
from matrixjobs.queue.handlers import HandlerRegistry, load_user_handlers
from matrixjobs.queue.queue import JobQueue
from matrixjobs.store import Store, create_store
from matrixjobs.supervisor import Supervisor
from matrixjobs.targets import COMMAND_TYPE, Targets

log = logging.getLogger(__name__)

RETENTION_SWEEP_S = 3600.0
ACTIVE = (Status.PENDING, Status.PROCESSING)
ACTIVE_LIMIT = 1000


class Component(Protocol):
    """An interface plugged into the service (Matrix bot, HTTP server, …)."""

    async def start(self) -> None: ...

    async def ready(self) -> None:
        """Return once the component serves (the bot has synced, the API listens)."""

    async def stop(self) -> None: ...


class App:
    def __init__(
        self,
        config: Config,
        handlers: HandlerRegistry | None = None,
        store: Store | None = None,
    ) -> None:
        self.config = config
        self.targets = Targets(config.targets)
        self.handlers = handlers or HandlerRegistry()
        self._commands = CommandHandler(self.targets, config.queue.kill_grace_s)
        self.handlers.register(COMMAND_TYPE, self._commands)
        load_user_handlers(config, self.handlers)
        self.store = store or create_store(config.store)
        self.monitor = ProgressMonitor(config.progress.interval_ms)
        self.queue = JobQueue(self.store, self.monitor, self.handlers, config.queue)
        self.components: list[Component] = []
        self._supervisor = Supervisor()
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.open()
        try:
            await self.queue.start()
        except BaseException:
            await self.store.close()
            raise
        self._started = True
        self._supervisor.keep("progress-monitor", self.monitor.run)
        self._supervisor.every("lease-heartbeat", self.config.queue.lease_s / 3,
                               self.queue.heartbeat)
        self._supervisor.every("retention", RETENTION_SWEEP_S, self.purge)
        await self.purge()
        for component in self.components:
            await component.start()
        log.info("matrixjobs started: store %s, %d workers, targets: %s",
                 self.config.store.path, self.config.queue.workers,
                 ", ".join(self.targets.names()) or "none")

    async def ready(self) -> None:
        """Return once every component serves."""
        await asyncio.gather(*(component.ready() for component in self.components))

    async def stop(self, grace_s: float = 0.0) -> None:
        """Take no new work; give running jobs `grace_s` to finish (the interfaces keep
        showing their progress meanwhile), requeue the rest, then stop the interfaces."""
        if not self._started:
            return
        self._started = False
        running = self.queue.running_count
        if running and grace_s > 0:
            log.info("stopping: %d running jobs get up to %gs to finish", running, grace_s)
        await self.queue.stop(grace_s)
        self.monitor.tick()  # publish the final and requeued states before the interfaces go
        for component in reversed(self.components):
            try:
                await component.stop()
            except Exception:
                log.exception("stopping %r failed", component)
        await self._supervisor.stop()
        await self.store.close()
        log.info("matrixjobs stopped")

    @property
    def accepting(self) -> bool:
        """Whether submits are taken (false while stopping)."""
        return self.queue.accepting

    def kill_jobs(self) -> None:
        """Kill every job subprocess at once: for a second stop signal, which exits
        without waiting for anything."""
        self._commands.kill_all()

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def purge(self) -> None:
        cutoff = time.time() - self.config.store.retention_days * 86400
        removed = await self.store.purge_finished(cutoff)
        if removed:
            log.info("retention: removed %d finished jobs/batches", removed)

    # -- the core's public API -------------------------------------------------------------------

    async def submit(
        self, target: str, args: Sequence[str] = (), dedupe_key: str | None = None,
        show: ProgressMessage | None = None, requester: str | None = None,
    ) -> Job:
        """Queue a configured target. `dedupe_key` makes a repeated request raise
        AlreadySubmittedError; `show` records where its progress will be shown;
        `requester` says who asked (a Matrix user id, "api", "cli", …)."""
        spec = self.targets.spec(target, list(args), requester)
        [job] = await self.queue.enqueue_many([spec], dedupe_key, show)
        return job

    async def submit_batch(
        self, targets: Sequence[str], name: str | None = None, dedupe_key: str | None = None,
        show: ProgressMessage | None = None, requester: str | None = None,
    ) -> Batch:
        specs = [self.targets.spec(target, requester=requester) for target in targets]
        batch, _ = await self.queue.enqueue_batch(name or " ".join(targets), specs, dedupe_key,
                                                  show)
        return batch

    async def cancel(self, subject: str) -> Job | Batch:
        return await self.queue.cancel(subject)

    async def status(self, subject: str) -> JobProgressEvent:
        """The current state of a job or batch, live if it is running."""
        subject = _canonical(subject)
        live = self.monitor.current(subject)
        if live is not None:
            return live
        if subject.startswith(BATCH_PREFIX):
            batch = await self.store.get_batch(subject)
            if batch is None:
                raise NotFoundError(f"no batch {subject}")
            return event_of(batch, time.time())
        job = await self.store.get_job(subject)
        if job is None:
            raise NotFoundError(f"no job {subject}")
        return event_of(job, time.time())

    def live(self, item: Job | Batch) -> JobProgressEvent:
        """The state of a listed job or batch: live (progress, ETA) while running."""
        return self.monitor.current(item.id) or event_of(item, time.time())

    async def watch(self, subject: str) -> AsyncIterator[JobProgressEvent]:
        """The current state, then every (throttled) update, ending with the terminal one."""
        subject = _canonical(subject)
        with_updates = self.monitor.subscribe(subject)
        try:
            first = await self.status(subject)
            yield first
            if first.terminal:
                return
            async for event in with_updates:
                # Skip what was already stale when `first` was read; never the end.
                if event.terminal or event.updated_at >= first.updated_at:
                    yield event
        finally:
            with_updates.close()

    async def active(self, limit: int = ACTIVE_LIMIT) -> list[JobProgressEvent]:
        """What is queued or running, live: batches, then jobs outside any batch (a
        batch's operations show in the batch)."""
        batches = await self.store.list_batches(ACTIVE, limit=limit)
        jobs = [job for job in await self.store.list_jobs(ACTIVE, limit=limit)
                if job.batch_id is None]
        return [self.live(item) for item in [*batches, *jobs]]

    async def jobs(
        self, statuses: Sequence[Status] | None = None, limit: int = 50, batch: str | None = None
    ) -> list[Job]:
        """Newest first; `batch` (an id like b3) keeps that batch's operations only."""
        batch_id = None if batch is None else _canonical(batch)
        if batch_id is not None and not batch_id.startswith(BATCH_PREFIX):
            raise NotFoundError(f"'{batch}' is not a batch id (like b3)")
        return await self.store.list_jobs(statuses, batch_id=batch_id, limit=limit)

    async def batches(
        self, statuses: Sequence[Status] | None = None, limit: int = 50
    ) -> list[Batch]:
        return await self.store.list_batches(statuses, limit=limit)

    async def progress_message(self, subject: str) -> ProgressMessage | None:
        """Where a room shows this job's or batch's progress, once that message was sent."""
        message = await self.store.get_message(_canonical(subject))
        return message if message is not None and message.event_id is not None else None


def _canonical(subject: str) -> str:
    parsed = parse_id(subject)
    if parsed is None:
        raise NotFoundError(f"'{subject}' is not a job or batch id (like j12 or b3)")
    return f"{parsed[0]}{parsed[1]}"

"""Work done by other processes sharing the store, made visible on this node.

Workers on other hosts save their jobs' progress at most once per `[progress]
interval_ms` and announce the ids of what changed (PostgreSQL NOTIFY). This feed reads
those jobs and batches back and hands them to the local monitor, which throttles them
exactly as its own jobs; so the room, the streams, MCP and the CLI follow a job that
runs elsewhere as one that runs here. A periodic full read covers announcements lost
while the listening connection was down.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Iterable

from matrixjobs.logs import Outage
from matrixjobs.models import BATCH_PREFIX, JOB_PREFIX, Job, Status
from matrixjobs.progress.monitor import ProgressMonitor
from matrixjobs.queue.queue import JobQueue
from matrixjobs.store.base import Store
from matrixjobs.store.health import troubled

log = logging.getLogger(__name__)

# The full read of running work when no announcement came, in case one was lost.
RESYNC_S = 5.0
ACTIVE_LIMIT = 1000
# Ends told that are remembered, so that a late second announcement of one is not told
# again: far more than can end within the few seconds news may arrive late.
ENDED_KEPT = 10_000


class RemoteFeed:
    def __init__(self, store: Store, monitor: ProgressMonitor, queue: JobQueue) -> None:
        self.store = store
        self.monitor = monitor
        self.queue = queue
        self._ids: set[str] = set()
        self._resync = True
        self._wakeup = asyncio.Event()
        self._followed: set[str] = set()  # remote jobs and batches seen unfinished
        self._seen: dict[str, tuple[object, ...]] = {}  # what was last told of each job
        self._ended: OrderedDict[str, None] = OrderedDict()  # ends told, newest last

    def changed(self, ids: Iterable[str]) -> None:
        """Announced by another process: these jobs or batches changed."""
        self._ids.update(ids)
        self._wakeup.set()

    def _end(self, subject: str) -> None:
        """Its end is told: later news of it (read late, or twice) is old news."""
        self._ended[subject] = None
        if len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)

    # -- told by the monitor of this process's own runs (a LifecycleObserver) --------------

    def job_started(self, job: Job) -> None:
        """It runs here: the local reporter tells the monitor about it from now on."""
        self._seen.pop(job.id, None)
        self._followed.discard(job.id)

    def job_settled(self, job: Job) -> None:
        """Settled here (its run ended, or a recovery or cancel here): the monitor was told."""
        if job.status.terminal:
            self._seen.pop(job.id, None)
            self._followed.discard(job.id)
            self._end(job.id)
        else:  # waiting again: another process may run it next
            self.follow([job])

    def follow(self, jobs: Iterable[Job]) -> None:
        """Jobs queued here, as the monitor already showed them: another process may run
        them, and the periodic read must catch their end even if all news of it is lost."""
        for job in jobs:
            self._followed.add(job.id)
            self._seen[job.id] = _state(job)

    def resync(self) -> None:
        """Announcements may have been lost (the listener reconnected): read everything."""
        self._resync = True
        self._wakeup.set()

    async def run(self) -> None:
        outage = Outage(log, "reading other workers' jobs", troubled)
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), RESYNC_S)
            except TimeoutError:
                self._resync = True
            self._wakeup.clear()
            announced, self._ids = self._ids, set()
            try:
                found: set[str] = set()
                if self._resync:
                    self._resync = False
                    found = await self._active()
                await self._refresh(announced | found, announced)
            except Exception:  # the store is away: read it all once it is back
                outage.failed("cannot read other workers' jobs from the store; retrying")
                self._resync = True
                await asyncio.sleep(1.0)
                continue
            outage.worked()

    async def _active(self) -> set[str]:
        active = (Status.PENDING, Status.PROCESSING)
        # Pending ones too: one may start and end between two reads, with the news of it lost.
        jobs = await self.store.list_jobs(active, limit=ACTIVE_LIMIT)
        batches = await self.store.list_batches(active, limit=ACTIVE_LIMIT)
        # What we followed and no longer see active ended meanwhile: read its end too.
        return {job.id for job in jobs} | {batch.id for batch in batches} | self._followed

    async def _refresh(self, ids: set[str], announced: set[str]) -> None:
        job_ids = sorted(i for i in ids if i.startswith(JOB_PREFIX) and i not in self._ended)
        jobs = await self.store.get_jobs(job_ids) if job_ids else []
        for gone in set(job_ids) - {job.id for job in jobs}:  # purged meanwhile
            self._seen.pop(gone, None)
            self._followed.discard(gone)
        for job in jobs:
            if self.queue.runs(job.id):
                self._seen.pop(job.id, None)  # ours: the local reporter and queue tell
                self._followed.discard(job.id)  # the monitor, its end included
                continue
            state = _state(job)
            first = job.id not in self._seen
            if self._seen.get(job.id) == state:
                continue  # nothing new since we last told the monitor
            if job.status.terminal:
                self._seen.pop(job.id, None)
                self._followed.discard(job.id)
                self._end(job.id)
            else:
                self._seen[job.id] = state
                self._followed.add(job.id)
            if job.status != Status.PROCESSING:
                self.queue.settled_elsewhere(job.id)
            if first and job.status == Status.PENDING and job.id not in announced:
                continue  # found waiting by a periodic read: whoever queued it said so
            self.monitor.job_remote(job)
        for batch_id in sorted(i for i in ids if i.startswith(BATCH_PREFIX)):
            if batch_id in self._ended:
                continue
            batch = await self.store.get_batch(batch_id)
            if batch is None:
                self._followed.discard(batch_id)
                continue
            if batch.status.terminal:
                self._followed.discard(batch_id)
                self._end(batch_id)
            else:
                self._followed.add(batch_id)
            self.monitor.batch_updated(batch)


def _state(job: Job) -> tuple[object, ...]:
    """What a job's event shows that another process may change."""
    progress = job.progress
    return (job.status, job.worker, job.retry_count,
            None if progress is None else (progress.current, progress.total, progress.message),
            job.approval)

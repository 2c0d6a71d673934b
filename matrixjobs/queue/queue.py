"""The durable job queue: enqueue, N concurrent workers, retries, timeouts, cancel.

One dispatcher task is the only writer of run state. Each cycle it commits the
outcomes of every run that ended since the last cycle and claims as many due
jobs as there are free workers, in a single transaction. Under load that
batches many jobs into one commit, and a job's outcome is always durable
before anyone is told about it. When jobs are so short that they finish
faster than a commit, one more round of jobs is claimed ahead into a local
ready list, so workers go on while the disk syncs.

Guarantee (at least once): a job is `processing` in the store from the moment
it is claimed until its outcome is committed. If the service dies in between,
the next start finds it and requeues it (counting a retry) or, with no retries
left, fails it with the error "interrupted". A handler may therefore run more
than once for the same job; make handlers idempotent where that matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from matrixjobs.audit import Entry
from matrixjobs.config import QueueConfig, WorkerConfig
from matrixjobs.errors import (
    AlreadyFinishedError,
    BadBatchError,
    JobFailedError,
    MatrixJobsError,
    NotFoundError,
    PermanentJobError,
    ShuttingDownError,
    UnknownJobTypeError,
    echo,
)
from matrixjobs.logs import Outage, redact
from matrixjobs.models import (
    BATCH_PREFIX,
    INTERRUPTED_BY_STOP,
    Batch,
    Job,
    JobSpec,
    Outcome,
    Progress,
    ProgressMessage,
    Status,
    batch_approval,
    parse_id,
)
from matrixjobs.progress.events import clean_progress
from matrixjobs.progress.monitor import ProgressMonitor
from matrixjobs.progress.reporter import ProgressReporter
from matrixjobs.queue.handlers import HandlerRegistry
from matrixjobs.queue.joblog import JobLogs, RunLog, tail
from matrixjobs.store.base import BatchCancel, Recovery, Store
from matrixjobs.store.health import StoreFault, StoreHealth, troubled

log = logging.getLogger(__name__)

IDLE_POLL_S = 1.0
# Claim ahead only while runs average less than this: a long job must never sit
# "processing" in the store while it waits for a worker.
PREFETCH_MAX_RUN_S = 0.05
# ...and only as many as the workers get through in this long (bounded below by one
# round of workers and above by PREFETCH_MAX_JOBS).
PREFETCH_WINDOW_S = 0.02
PREFETCH_MAX_JOBS = 500
MAX_BACKOFF_S = 3600.0
STORE_RETRY_S = 1.0
# While the disk is almost full, what is kept of each finished job's log.
LOW_SPACE_LINES = 200
LOW_SPACE_BYTES = 16 * 1024
# How often a cancel waiting for a job that runs on another process looks at the store
# (a settle announced by that process ends the wait sooner).
SETTLE_POLL_S = 0.5


# Written when a stop begins: if the stop is then cut short (a second signal), the next
# start knows this owner's running jobs were stopped, not the cause of a crash.
SETTING_STOPPING_OWNER = "queue.stopping_owner"


@dataclass(slots=True)
class Running:
    job: Job
    reporter: ProgressReporter
    task: asyncio.Task[Outcome]
    started: float = 0.0
    log: RunLog | None = None
    saved: object = None  # the reporter state last saved in the store


class JobQueue:
    def __init__(
        self,
        store: Store,
        monitor: ProgressMonitor,
        handlers: HandlerRegistry,
        config: QueueConfig,
        logs: JobLogs,
        worker: WorkerConfig | None = None,
        clock: Callable[[], float] = time.time,
        health: StoreHealth | None = None,
    ) -> None:
        self.store = store
        self.health = health or StoreHealth(clock)
        self.worker = worker or WorkerConfig()
        self.monitor = monitor
        self.handlers = handlers
        self.config = config
        self.logs = logs
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._clock = clock
        self._running: dict[str, Running] = {}
        self._ready: deque[Job] = deque()
        self._average_run_s: float | None = None
        self._outcomes: list[tuple[Job, Outcome]] = []
        self._cancel_requested: set[str] = set()
        self._remote_cancel: set[str] = set()  # of _cancel_requested: asked for elsewhere
        self._lost: set[str] = set()  # running here, but another node holds them now
        self._cut_logs: set[str] = set()  # running, their log kept in part (disk full)
        self._held: set[str] = set()  # claimed by us, outcome not committed yet
        self._ahead: set[str] = set()  # of _ready: claimed ahead, the store knows them so
        self._started_ahead: list[str] = []  # started since the last cycle told the store
        self._settle_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._wakeup = asyncio.Event()
        self._maybe_due = True
        self._pokes = 0
        self._accepting = False
        self._closing = False
        self._dispatcher: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        stopped = await self.store.get_setting(self._stopping_key)
        gone = [*await self._dead_here(), *([stopped] if stopped else [])]
        recovery = await self.store.recover_interrupted(self.owner, self._clock(), stopped,
                                                        gone)
        if stopped:
            await self.store.set_setting(self._stopping_key, "")
        self._publish_recovery(recovery)
        self._accepting = True
        self._dispatcher = asyncio.create_task(self._dispatch(), name="matrixjobs-dispatcher")

    async def _dead_here(self) -> list[str]:
        """The workers of this host whose process is gone (our own earlier run, say): their
        jobs need not wait for their leases to run out."""
        if not self.store.shared:
            return []
        host, dead = socket.gethostname(), []
        now = self._clock()
        for worker in await self.store.list_workers():
            if worker.host == host and not _pid_alive(worker.pid):
                dead.append(worker.id)
                if worker.name == self.worker.name:
                    await self.store.unregister_worker(worker.id)  # we replace it
            elif worker.name == self.worker.name and worker.alive(now, self.config.lease_s):
                log.warning("another live process is named %r (pid %d on %s): give each "
                            "process sharing the store its own [worker] name", worker.name,
                            worker.pid, worker.host)
        return dead

    @property
    def _stopping_key(self) -> str:
        # Per worker name: processes sharing a store each record their own stop.
        if not self.store.shared:
            return SETTING_STOPPING_OWNER
        return f"{SETTING_STOPPING_OWNER}:{self.worker.name}"

    async def recover_expired(self) -> None:
        """Take back the jobs of workers that died or lost the store (their lease ran out)."""
        self._publish_recovery(await self.store.recover_expired(self._clock()))

    def _publish_recovery(self, recovery: Recovery) -> None:
        for job in recovery.cancelled:
            log.info("job %s (%s) was being cancelled when the service stopped; cancelled",
                     job.id, job.name)
            self.monitor.job_settled(job)
        for job in recovery.resumed:
            log.info("job %s (%s) was stopped with the service; running it again",
                     job.id, job.name)
            self.monitor.job_settled(job)
        for job in recovery.requeued:
            log.warning("job %s (%s) was interrupted; retrying (%d/%d)",
                        job.id, job.name, job.retry_count, job.max_retries)
            self.monitor.job_settled(job)
        for job in recovery.failed:
            log.warning("job %s (%s) was interrupted with no retries left; failed",
                        job.id, job.name)
            self.monitor.job_settled(job)
        for batch in recovery.batches:
            self.monitor.batch_updated(batch)
        if recovery.requeued or recovery.resumed:
            self._poke()

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop taking work; give running jobs `grace_s`, then requeue the rest."""
        self._accepting = False
        if self._running:
            try:
                await self.store.set_setting(self._stopping_key, self.owner)
            except Exception:  # the stop itself must go on
                log.warning("could not record the stop: if it is cut short, the running "
                            "jobs each spend a retry when they run again")
        self._release_ready(keep=0)
        tasks = [r.task for r in self._running.values()]
        if tasks and grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)
        for running in list(self._running.values()):
            running.task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._closing = True
        self._wakeup.set()
        if self._dispatcher is not None:
            await self._dispatcher
            self._dispatcher = None

    @property
    def running_count(self) -> int:
        return len(self._running)

    # -- adding work ---------------------------------------------------------------------------

    async def enqueue(self, spec: JobSpec) -> Job:
        return (await self.enqueue_many([spec]))[0]

    async def enqueue_many(
        self, specs: Sequence[JobSpec], dedupe_key: str | None = None,
        show: ProgressMessage | None = None, audit: Entry | None = None,
    ) -> list[Job]:
        """Add jobs in one transaction (one commit for all of them).

        A `dedupe_key` (e.g. the chat message that asked) can add work only once:
        a second call with it raises AlreadySubmittedError. `show` records, in the
        same transaction, where an interface will show the job's progress.
        """
        resolved = [self._resolve(spec) for spec in specs]
        jobs = await self.store.add_jobs(resolved, self._clock(), dedupe_key, show, audit)
        for job in jobs:
            self.monitor.job_queued(job)
        self._poke()
        return jobs

    async def enqueue_batch(
        self, name: str, specs: Sequence[JobSpec], dedupe_key: str | None = None,
        show: ProgressMessage | None = None, audit: Entry | None = None,
    ) -> tuple[Batch, list[Job]]:
        if not specs:
            raise BadBatchError("a batch needs at least one operation")
        if len(specs) > self.config.max_batch_size:
            raise BadBatchError(
                f"batch too large: {len(specs)} operations (at most {self.config.max_batch_size})"
            )
        # The batch is approved as a whole: its operations wait for it, not each for its own.
        approval = batch_approval(specs)
        resolved = [replace(self._resolve(spec), approval=None) for spec in specs]
        batch, jobs = await self.store.add_batch(name, resolved, self._clock(), dedupe_key,
                                                 show, approval, audit)
        self.monitor.batch_updated(batch)
        for job in jobs:
            self.monitor.job_queued(job)
        self._poke()
        return batch, jobs

    @property
    def accepting(self) -> bool:
        """Started and not stopping: submits are taken."""
        return self._accepting

    def _resolve(self, spec: JobSpec) -> JobSpec:
        if not self._accepting:
            raise ShuttingDownError("matrixjobs is shutting down; send it again once it is back")
        if spec.type not in self.handlers:
            raise UnknownJobTypeError(spec.type)
        return replace(
            spec,
            max_retries=self.config.max_retries if spec.max_retries is None else spec.max_retries,
            timeout_s=self.config.default_timeout_s if spec.timeout_s is None else spec.timeout_s,
        )

    def wake(self) -> None:
        """Work may be due (another process added or gave back jobs): claim now."""
        self._poke()

    def _poke(self) -> None:
        self._maybe_due = True
        self._pokes += 1
        self._wakeup.set()

    # -- the dispatcher --------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        outage = Outage(log, "store cycle", troubled)
        while True:
            try:
                if await self._cycle():
                    outage.worked()
                    continue
                if self._closing:
                    return
                await self._idle()
            except Exception as exc:
                self.health.failed(exc)
                if self._closing:
                    # Uncommitted outcomes leave their jobs `processing`: the next
                    # start recovers them, so stopping must not wait on a broken store.
                    log.exception("store failed while stopping; %d outcomes not saved",
                                  len(self._outcomes))
                    return
                outage.failed("store cycle failed; retrying every %.0fs (%d outcomes wait)",
                              STORE_RETRY_S, len(self._outcomes))
                await asyncio.sleep(STORE_RETRY_S)

    async def _cycle(self) -> bool:
        if not self._accepting:
            self._release_ready(keep=0)
        elif not self._prefetch():  # no worker will take the extra ones soon
            self._release_ready(keep=max(self.config.workers - len(self._running), 0))
        outcomes, self._outcomes = self._outcomes, []
        capacity = self.config.workers + self._prefetch() if self._accepting else 0
        want = capacity - len(self._running) - len(self._ready) if self._maybe_due else 0
        started, self._started_ahead = self._started_ahead, []
        if not outcomes and want <= 0 and not started:
            return False
        # What no free slot takes at once is claimed ahead: it may never start here.
        free = self.config.workers - len(self._running) - len(self._ready)
        ahead = max(want - max(free, 0), 0) if want > 0 else 0
        pokes = self._pokes
        began = time.monotonic()
        try:
            cycle = await self.store.settle_and_claim(
                [outcome for _, outcome in outcomes], self.owner, want, self._clock(),
                self.config.lease_s, self.worker.labels, self.worker.name, ahead, started,
            )
        except BaseException:
            self._outcomes[:0] = outcomes  # nothing was committed: keep them for the next try
            self._started_ahead[:0] = started
            raise
        if cycle.claimed or outcomes:  # an idle poll that found nothing says nothing
            log.debug("store cycle: claimed %d of %d wanted (%d ahead of a free slot), "
                      "settled %d outcomes, in %.0f ms", len(cycle.claimed), max(want, 0),
                      ahead, len(outcomes), (time.monotonic() - began) * 1000)
        self._ahead.update(job.id for job in cycle.claimed[want - ahead:])
        self._held.difference_update(job.id for job, _ in outcomes)
        self._held.update(job.id for job in cycle.claimed)
        for job, outcome in outcomes:
            _apply(job, outcome)
            self.monitor.job_settled(job)
            for waiter in self._settle_waiters.pop(job.id, ()):
                if not waiter.done():
                    waiter.set_result(None)
        for batch in cycle.batches:
            self.monitor.batch_updated(batch)
        self._ready.extend(cycle.claimed)
        if self._accepting:
            self._fill()
        else:  # stop() began while we were claiming
            self._release_ready(keep=0)
        if want > 0 and len(cycle.claimed) < want and pokes == self._pokes:
            self._maybe_due = False  # drained, and nothing was enqueued meanwhile
        return True

    async def _idle(self) -> None:
        timeout = IDLE_POLL_S
        if not self._maybe_due and self._accepting:
            due = await self.store.next_due()
            if due is not None:
                timeout = min(max(due - self._clock(), 0.0), IDLE_POLL_S)
        if timeout > 0:
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                self._maybe_due = True
        else:
            self._maybe_due = True
        self._wakeup.clear()

    # -- running one job ---------------------------------------------------------------------------

    def _prefetch(self) -> int:
        average = self._average_run_s
        if average is None or average >= PREFETCH_MAX_RUN_S:
            return 0
        oldest = time.monotonic() - PREFETCH_MAX_RUN_S
        if any(running.started < oldest for running in self._running.values()):
            return 0  # a long one is running: ahead-claimed jobs could wait for ages
        workers = self.config.workers
        return min(max(workers, int(workers * PREFETCH_WINDOW_S / max(average, 1e-6))),
                   PREFETCH_MAX_JOBS)

    def _release_ready(self, keep: int) -> None:
        """Give ahead-claimed jobs back to pending, as they were, keeping the first `keep`."""
        if len(self._ready) > keep:
            log.debug("giving back %d jobs claimed ahead (keeping %d)",
                      len(self._ready) - keep, keep)
        while len(self._ready) > keep:
            job = self._ready.pop()
            self._ahead.discard(job.id)
            self._finish(job, Outcome(job.id, Status.PENDING, self._clock(), error=job.error,
                                      retry_at=self._clock(), count_retry=False))

    def _fill(self) -> None:
        while self._ready and len(self._running) < self.config.workers and self._accepting:
            self._start(self._ready.popleft())

    def _start(self, job: Job) -> None:
        if job.id in self._ahead:
            self._ahead.discard(job.id)
            self._started_ahead.append(job.id)  # the store learns it with the next cycle
            job.started_at = job.started_at or self._clock()
        if job.id in self._cancel_requested:
            self._remote_cancel.discard(job.id)
            self._finish(job, Outcome(job.id, Status.CANCELLED, self._clock(), error="cancelled"))
            return
        run_log = self.logs.create(job)
        reporter = ProgressReporter() if run_log is None else ProgressReporter(run_log.write)
        task = asyncio.create_task(self._run(job, reporter, run_log), name=f"job-{job.id}")
        running = Running(job, reporter, task, time.monotonic(), run_log)
        self._running[job.id] = running
        task.add_done_callback(lambda _: self._ended(running))
        self.monitor.job_started(job, reporter)

    async def _run(self, job: Job, reporter: ProgressReporter,
                   run_log: RunLog | None) -> Outcome:
        deadline = asyncio.timeout(job.timeout_s)
        try:
            if run_log is not None:
                if job.retry_count or job.error:  # it ran before
                    run_log.earlier = await self._earlier_log(job)
                self.logs.publish(job.id, run_log)
            handler = self.handlers.get(job.type)
            async with deadline:
                result = await handler.run(job, reporter)
            return Outcome(job.id, Status.COMPLETED, self._clock(), result=_jsonable(result))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                return self._interrupted(job)
            # The handler's own CancelledError (e.g. from a library it uses): a failure.
            return self._failure(job, "CancelledError raised by the handler", retryable=True)
        except TimeoutError as exc:
            if not deadline.expired():
                return self._failure(job, f"TimeoutError: {exc}", retryable=True)
            return self._failure(job, f"timed out after {job.timeout_s:g}s", retryable=True)
        except (PermanentJobError, UnknownJobTypeError) as exc:
            return self._failure(job, str(exc), retryable=False)
        except JobFailedError as exc:  # an expected failure (exit code, …): no traceback
            log.info("job %s (%s) failed: %s", job.id, job.name, str(exc).partition("\n")[0])
            return self._failure(job, str(exc), retryable=True)
        except BaseException as exc:  # SystemExit from a handler must not stop the service
            log.info("job %s (%s) failed: %r", job.id, job.name, exc, exc_info=exc)
            reporter.log("".join(traceback.format_exception(exc)))
            return self._failure(job, _describe(exc), retryable=True)

    async def _earlier_log(self, job: Job) -> str:
        try:
            return await self.store.get_log(job.id) or ""
        except Exception:  # the run matters more than its earlier runs' output
            log.warning("job %s: cannot read the log of its earlier runs", job.id, exc_info=True)
            return ""

    def _ended(self, running: Running) -> None:
        """The task's done callback: it runs even if the task was cancelled before it began."""
        job, task = running.job, running.task
        if task.cancelled():
            outcome = self._interrupted(job)
        elif (error := task.exception()) is not None:
            outcome = self._failure(job, _describe(error), retryable=True)
        else:
            outcome = task.result()
        if job.id in self._remote_cancel:
            self._remote_cancel.discard(job.id)
            self._cancel_requested.discard(job.id)
        if job.id in self._lost:
            self._cut_logs.discard(job.id)
            self._drop_lost(running)
            return
        outcome.progress = _progress(running.reporter)
        if running.log is not None:
            # A silent success after earlier runs still says so: their last line
            # reads "it runs again".
            silent = running.log.empty and not running.log.earlier
            outcome.log = self.logs.end(job.id, _footer(outcome, silent))
            if outcome.log is not None:
                outcome.log = self._within_space(job.id, outcome.log)
            self._cut_logs.discard(job.id)
        self._running.pop(job.id, None)
        self._finish(job, outcome)
        took = time.monotonic() - running.started
        average = self._average_run_s
        self._average_run_s = took if average is None else 0.8 * average + 0.2 * took
        self._fill()

    def _interrupted(self, job: Job) -> Outcome:
        now = self._clock()
        if job.id in self._cancel_requested:
            return Outcome(job.id, Status.CANCELLED, now, error="cancelled")
        # Shutdown: back to pending without spending a retry; it runs again after restart.
        log.info("job %s (%s) stopped with the service; it runs again after the restart",
                 job.id, job.name)
        return Outcome(job.id, Status.PENDING, now, error=INTERRUPTED_BY_STOP,
                       retry_at=now, count_retry=False)

    def _failure(self, job: Job, error: str, retryable: bool) -> Outcome:
        """A failed run; its error (often the end of the job's output) is masked like its
        log: it is shown in the room, the API, the dashboard and MCP."""
        error = redact(error)
        now = self._clock()
        if retryable and job.retry_count < job.max_retries:
            delay = min(self.config.retry_backoff_s * 2**job.retry_count, MAX_BACKOFF_S)
            return Outcome(job.id, Status.PENDING, now, error=error, retry_at=now + delay)
        return Outcome(job.id, Status.FAILED, now, error=error)

    def _finish(self, job: Job, outcome: Outcome) -> None:
        self._outcomes.append((job, outcome))
        self._wakeup.set()

    def settled_elsewhere(self, job_id: str) -> None:
        """Another process committed an outcome for `job_id`: end waits for it."""
        for waiter in self._settle_waiters.pop(job_id, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def flush_progress(self) -> None:
        """Save the progress that changed since the last save, for other processes."""
        changed, states = self._unsaved_progress()
        if changed:
            await self.store.save_progress(changed, self.owner)
        self._saved(states)

    def _unsaved_progress(self) -> tuple[dict[str, Progress], dict[str, object]]:
        """The progress of running jobs that changed since it was last saved, and the
        reporter states it was read from (for `_saved` once the store has them)."""
        changed: dict[str, Progress] = {}
        states: dict[str, object] = {}
        for job_id, running in self._running.items():
            state = running.reporter.state
            if state is running.saved:
                continue
            states[job_id] = state
            progress = _progress(running.reporter)
            if progress is not None:
                changed[job_id] = progress
        return changed, states

    def _saved(self, states: dict[str, object]) -> None:
        for job_id, state in states.items():
            running = self._running.get(job_id)
            if running is not None:
                running.saved = state

    def runs(self, job_id: str) -> bool:
        """Whether this process holds `job_id`: claimed, and its outcome not committed yet."""
        return job_id in self._held

    def settling(self, job_id: str) -> bool:
        """Whether a run of `job_id` ended here and its outcome is about to be committed."""
        return (job_id in self._held and job_id not in self._running
                and all(job.id != job_id for job in self._ready))

    # -- leases ---------------------------------------------------------------------------------

    async def heartbeat(self) -> None:
        """Extend our leases and save each running job's latest progress; stop the jobs we
        no longer hold and those whose cancel was asked for elsewhere."""
        snapshots, states = self._unsaved_progress()
        # Every job claimed and not settled yet (running, ready, or its outcome waiting): a
        # job the store gave us in a transaction we never heard back from is not among
        # them, so its lease runs out and another node takes it back.
        beat = await self.store.heartbeat(self.owner, snapshots, self._clock(),
                                          self.config.lease_s, sorted(self._held))
        self._saved(states)
        for job_id in beat.lost:
            self.lose(job_id)
        for job_id in beat.cancel:
            self.cancel_here(job_id)
        await self.flush_logs()

    async def flush_logs(self) -> None:
        """Save the running jobs' logs that changed since the last save."""
        unsaved = self.logs.unsaved()
        if unsaved:
            try:
                await self.store.save_logs({job_id: self._within_space(job_id, text)
                                            for job_id, text in unsaved.items()})
            except BaseException:
                self.logs.unsave(unsaved)  # saved next time, not lost
                raise

    def _within_space(self, job_id: str, text: str) -> str:
        """A log to save: while the disk is (almost) full, its last part only, said once
        per run (it is saved again and again while the job runs)."""
        if self.health.fault is not StoreFault.DISK_FULL:
            return text
        kept = tail(text, LOW_SPACE_LINES, LOW_SPACE_BYTES)
        if len(kept) == len(text):
            return text
        if job_id not in self._cut_logs:
            self._cut_logs.add(job_id)
            log.warning("job %s: the disk is almost full; keeping only the last %d KiB of "
                        "its log", job_id, LOW_SPACE_BYTES // 1024)
        return f"[… the disk was almost full: only the end of this log was kept]\n{kept}"

    def lose(self, job_id: str) -> None:
        """Another node took `job_id` over (our lease ran out): stop our run of it; its
        outcome would be refused anyway (fencing)."""
        if job_id in self._lost:
            return
        running = self._running.get(job_id)
        if running is not None:
            log.warning("job %s (%s): its lease ran out and another worker took it over; "
                        "stopping the run here", job_id, running.job.name)
            self._lost.add(job_id)
            running.task.cancel()
            return
        for ready in self._ready:
            if ready.id == job_id:
                self._ready.remove(ready)
                self._held.discard(job_id)
                self._ahead.discard(job_id)
                return

    def _drop_lost(self, running: Running) -> None:
        job = running.job
        self._lost.discard(job.id)
        self._held.discard(job.id)
        self._running.pop(job.id, None)
        if running.log is not None:
            self.logs.end(job.id, "stopped here: another worker took this job over")
        self.monitor.forget(job.id)
        self._fill()

    # -- cancelling -------------------------------------------------------------------------------

    def cancel_here(self, job_id: str) -> None:
        """A cancel asked for on another node: stop the job if it runs here."""
        if job_id in self._cancel_requested:
            return
        if job_id in self._running or any(job.id == job_id for job in self._ready):
            self._cancel_requested.add(job_id)
            self._remote_cancel.add(job_id)
            self._interrupt(job_id)

    async def cancel(self, subject: str, audit: Entry | None = None) -> Job | Batch:
        """Cancel a job or batch; return it in the state it ended in. `audit` is recorded
        with the first change the cancel makes."""
        parsed = parse_id(subject)
        if parsed is None:
            raise NotFoundError(f"'{echo(subject)}' is not a job or batch id (like j12 or b3)")
        subject = f"{parsed[0]}{parsed[1]}"
        if parsed[0] == BATCH_PREFIX:
            return await self._cancel_batch(subject, audit)
        return await self._cancel_job(subject, audit)

    async def _cancel_job(self, job_id: str, audit: Entry | None) -> Job:
        job = await self.store.get_job(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id}")
        if job.status.terminal:
            raise AlreadyFinishedError(f"job {job_id} already {job.status}")
        self._cancel_requested.add(job_id)
        try:
            while not job.status.terminal:
                if job.status == Status.PENDING:
                    cancelled = await self.store.cancel_pending(job_id, self._clock(), audit)
                    if cancelled is not None:
                        job, batch = cancelled
                        self.monitor.job_settled(job)
                        if batch is not None:
                            self.monitor.batch_updated(batch)
                        return job
                else:
                    if await self.store.request_cancel(job_id, audit):
                        audit = None  # recorded once, with the first change
                    self._interrupt(job_id)
                    await self._settled(job_id)
                found = await self.store.get_job(job_id)
                if found is None:
                    raise NotFoundError(f"no job {job_id}")
                job = found
            if audit is not None:
                # A job claimed ahead of its start ended by the claim being given back, a
                # change made by the run's own outcome: the cancel is recorded after it.
                await self.store.append_audit(audit)
            return job
        finally:
            self._cancel_requested.discard(job_id)

    async def _cancel_batch(self, batch_id: str, audit: Entry | None) -> Batch:
        batch = await self.store.get_batch(batch_id)
        if batch is None:
            raise NotFoundError(f"no batch {batch_id}")
        if batch.status.terminal:
            raise AlreadyFinishedError(f"batch {batch_id} already {batch.status}")
        result = await self.store.cancel_batch(batch_id, self._clock(), audit)
        if result is None:
            raise NotFoundError(f"no batch {batch_id}")
        self._publish_cancel(result)
        self._cancel_requested.update(result.running)
        try:
            for job_id in result.running:
                self._interrupt(job_id)
            await asyncio.gather(*(self._settled(job_id) for job_id in result.running))
        finally:
            self._cancel_requested.difference_update(result.running)
        # A claimed-ahead job given back meanwhile is pending again: cancel it too.
        again = await self.store.cancel_batch(batch_id, self._clock())
        if again is None:
            raise NotFoundError(f"no batch {batch_id}")
        if again.cancelled:
            self._publish_cancel(again)
        return again.batch

    def _publish_cancel(self, result: BatchCancel) -> None:
        for job in result.cancelled:
            self.monitor.job_settled(job)
        self.monitor.batch_updated(result.batch)

    def _interrupt(self, job_id: str) -> None:
        """Stop a job this queue holds (its id must be in `_cancel_requested`)."""
        running = self._running.get(job_id)
        if running is not None:
            running.task.cancel()
            return
        for ready in self._ready:
            if ready.id == job_id:  # claimed ahead, not started: `_start` cancels it at once
                self._ready.remove(ready)
                self._start(ready)
                return

    async def _settled(self, job_id: str) -> None:
        """Wait until the current run of `job_id` has its outcome committed (here, or by
        the process that runs it)."""
        waiter = asyncio.get_running_loop().create_future()
        self._settle_waiters.setdefault(job_id, []).append(waiter)
        deadline = time.monotonic() + self.config.kill_grace_s + 30
        try:
            while not waiter.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("job %s did not stop in time after cancel", job_id)
                    return
                elsewhere = self.store.shared and job_id not in self._running
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiter),
                                           min(left, SETTLE_POLL_S) if elsewhere else left)
                if elsewhere and not waiter.done():
                    job = await self.store.get_job(job_id)
                    if job is None or job.status != Status.PROCESSING:
                        return
        finally:
            waiters = self._settle_waiters.get(job_id)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._settle_waiters[job_id]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _apply(job: Job, outcome: Outcome) -> None:
    job.error = outcome.error
    job.progress = outcome.progress
    if outcome.retry_at is not None:
        job.status = Status.PENDING
        job.run_after = outcome.retry_at
        job.retry_count += int(outcome.count_retry)
    else:
        job.status = outcome.status
        job.finished_at = outcome.finished_at
        job.result = outcome.result


def _footer(outcome: Outcome, empty: bool) -> str | None:
    """How a run ended, as the last line of its log; None for a silent success."""
    if outcome.retry_at is not None:
        if not outcome.count_retry:
            return "stopped with the service; it runs again after the restart"
        return f"failed: {_first_line(outcome.error)}; it runs again"
    if outcome.status == Status.COMPLETED:
        return None if empty else "completed"
    if outcome.status == Status.CANCELLED:
        return "cancelled"
    return f"failed: {_first_line(outcome.error)}"


def _first_line(text: str | None) -> str:
    return (text or "").partition("\n")[0]


def _progress(reporter: ProgressReporter) -> Progress | None:
    state = reporter.state
    cleaned = clean_progress(*state) if isinstance(state, tuple) and len(state) == 3 else None
    if cleaned is None:
        return None
    info, message = cleaned
    return Progress(info.current, info.total, message)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, MatrixJobsError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _jsonable(result: Any) -> Any:
    try:
        json.dumps(result)
    except (TypeError, ValueError):
        return repr(result)[:2000]
    return result

"""The progress monitor: turns job lifecycle and handler reports into throttled events.

Status changes are published the moment the queue reports them, in order.
Progress is sampled on a tick: an id that changed is published at most once
per interval, and the latest state always goes out on a later tick (trailing
edge). Trackers exist only for running jobs and unfinished batches.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from matrixjobs.models import Batch, Job, Status
from matrixjobs.progress.events import (
    JobProgressEvent,
    ProgressInfo,
    batch_event,
    clean_progress,
    job_event,
)
from matrixjobs.progress.reporter import ProgressReporter
from matrixjobs.progress.subscription import Subscription


@dataclass(slots=True)
class RateEstimate:
    """Average speed since the first sample with the current total; gives the ETA."""

    start_time: float = 0.0
    start_value: float = 0.0
    total: float | None = None

    def eta(self, now: float, progress: ProgressInfo) -> float | None:
        if progress.total != self.total or progress.current < self.start_value:
            self.start_time, self.start_value, self.total = now, progress.current, progress.total
            return None
        done = progress.current - self.start_value
        if progress.total is None or done <= 0 or now <= self.start_time:
            return None
        remaining = max(progress.total - progress.current, 0.0)
        return round(remaining * (now - self.start_time) / done, 1)


@dataclass(slots=True)
class JobTracker:
    job: Job
    reporter: ProgressReporter
    sampled: object = None
    progress: ProgressInfo | None = None
    message: str | None = None
    eta: float | None = None
    rate: RateEstimate = field(default_factory=RateEstimate)
    dirty: bool = False
    last_emit: float = 0.0
    remote: bool = False  # run by another process: its progress comes from the store


@dataclass(slots=True)
class BatchTracker:
    batch: Batch
    running: dict[str, JobTracker] = field(default_factory=dict)
    dirty: bool = False
    last_emit: float = 0.0

    def current(self) -> JobTracker | None:
        # The operation started last is the one people want to see.
        return next(reversed(self.running.values()), None)


class LifecycleObserver(Protocol):
    """Told of every run's start and every settled run, each once, in commit order, with
    the job as the store has it (e.g. the metrics); never dropped, unlike events."""

    def job_started(self, job: Job) -> None: ...

    def job_settled(self, job: Job) -> None: ...


class ProgressMonitor:
    def __init__(
        self,
        interval_ms: int = 500,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        max_pending: int = 1000,
        observers: Sequence[LifecycleObserver] = (),
    ) -> None:
        self.interval = interval_ms / 1000
        self._observers = list(observers)
        self._clock = clock
        self._monotonic = monotonic
        self._max_pending = max_pending
        self._jobs: dict[str, JobTracker] = {}
        self._batches: dict[str, BatchTracker] = {}
        self._all: set[Subscription] = set()
        self._by_id: dict[str, set[Subscription]] = {}

    def observe(self, observer: LifecycleObserver) -> None:
        """Tell `observer` too of every run's start and every settled run from now on."""
        self._observers.append(observer)

    # -- what the queue tells us -------------------------------------------------------------

    def job_queued(self, job: Job) -> None:
        """A job is pending: new, or waiting for a retry."""
        self._publish(job.id, lambda: job_event(job, self._clock()))

    def job_started(self, job: Job, reporter: ProgressReporter) -> None:
        for observer in self._observers:
            observer.job_started(job)
        self._track(JobTracker(job=job, reporter=reporter, last_emit=self._monotonic()))

    def _track(self, tracker: JobTracker) -> None:
        job = tracker.job
        self._jobs[job.id] = tracker
        batch = self._batches.get(job.batch_id) if job.batch_id else None
        if batch is not None:
            batch.running[job.id] = tracker
            batch.dirty = True
        self._publish(job.id, lambda: job_event(job, self._clock()))

    def job_remote(self, job: Job) -> None:
        """A job another process runs, queued or settled, as the store has it now: published
        as if it ran here (throttled progress included). Observers are not told: the
        process that runs it tells its own."""
        tracker = self._jobs.get(job.id)
        if tracker is not None and not tracker.remote:
            return  # it runs here: the local reporter knows better
        if tracker is None and job.status == Status.PROCESSING:
            tracker = JobTracker(job=job, reporter=ProgressReporter(),
                                 last_emit=self._monotonic(), remote=True)
            self._track(tracker)
        if tracker is not None:
            tracker.job = job
            progress = job.progress
            state = None if progress is None else (progress.current, progress.total,
                                                   progress.message)
            if state is not None and state != tracker.reporter.state:
                tracker.reporter.report(*state)
        if job.status == Status.PROCESSING:
            return
        if tracker is not None:
            self._untrack(job.id, job.batch_id)  # with the final progress the store has
        self._publish(job.id, lambda: self._job_event(job, tracker))

    def forget(self, job_id: str) -> None:
        """Stop following a job without saying anything: another process runs it now."""
        tracker = self._jobs.get(job_id)
        if tracker is not None:
            self._untrack(job_id, tracker.job.batch_id)

    def _untrack(self, job_id: str, batch_id: str | None) -> JobTracker | None:
        """Stop following a job (its last report sampled); its batch has changed."""
        tracker = self._jobs.pop(job_id, None)
        if tracker is not None:
            self._sample(tracker)
        batch = self._batches.get(batch_id) if batch_id else None
        if batch is not None:
            batch.running.pop(job_id, None)
            batch.dirty = True
        return tracker

    def job_settled(self, job: Job) -> None:
        """A run ended: the job is terminal, or pending again for a retry."""
        for observer in self._observers:
            observer.job_settled(job)
        tracker = self._untrack(job.id, job.batch_id)
        self._publish(job.id, lambda: self._job_event(job, tracker))

    def batch_updated(self, batch: Batch) -> None:
        tracker = self._batches.get(batch.id)
        if tracker is None:
            if batch.status.terminal:
                self._publish(batch.id, lambda: batch_event(batch, self._clock()))
                return
            tracker = self._batches[batch.id] = BatchTracker(batch=batch)
            changed = True
        else:
            changed = tracker.batch.status != batch.status
            tracker.batch = batch
        if batch.status.terminal:
            del self._batches[batch.id]
        if changed:
            tracker.dirty = False
            tracker.last_emit = self._monotonic()
            self._publish(batch.id, lambda: self._batch_event(tracker))
        else:
            tracker.dirty = True

    # -- reading -------------------------------------------------------------------------------

    def current(self, subject: str) -> JobProgressEvent | None:
        """The live state of a running job or unfinished batch; None for anything else."""
        job = self._jobs.get(subject)
        if job is not None:
            self._sample(job)
            return self._job_event(job.job, job)
        batch = self._batches.get(subject)
        return None if batch is None else self._batch_event(batch)

    def active_ids(self) -> list[str]:
        return [*self._jobs, *self._batches]

    def subscribe(self, subject: str | None = None) -> Subscription:
        """Start buffering events (of one id, or all) right away; iterate to read them."""
        subscription = Subscription(subject, self._max_pending, self._unsubscribe)
        if subject is None:
            self._all.add(subscription)
        else:
            self._by_id.setdefault(subject, set()).add(subscription)
        return subscription

    @property
    def subscriber_count(self) -> int:
        return len(self._all) + sum(len(subs) for subs in self._by_id.values())

    def _unsubscribe(self, subscription: Subscription) -> None:
        if subscription.subject is None:
            self._all.discard(subscription)
            return
        subs = self._by_id.get(subscription.subject)
        if subs is not None:
            subs.discard(subscription)
            if not subs:
                del self._by_id[subscription.subject]

    # -- the tick --------------------------------------------------------------------------------

    async def run(self) -> None:
        period = max(self.interval / 4, 0.005)
        while True:
            await asyncio.sleep(period)
            self.tick()

    def tick(self) -> None:
        now = self._monotonic()
        for tracker in list(self._jobs.values()):
            if self._sample(tracker) and tracker.job.batch_id in self._batches:
                self._batches[tracker.job.batch_id].dirty = True
            if tracker.dirty and now - tracker.last_emit >= self.interval:
                tracker.dirty = False
                tracker.last_emit = now
                self._publish(tracker.job.id, lambda t=tracker: self._job_event(t.job, t))
        for batch in list(self._batches.values()):
            if batch.dirty and now - batch.last_emit >= self.interval:
                batch.dirty = False
                batch.last_emit = now
                self._publish(batch.batch.id, lambda b=batch: self._batch_event(b))

    def _sample(self, tracker: JobTracker) -> bool:
        """Take the reporter's latest state; True when it changed."""
        state = tracker.reporter.state
        if state is tracker.sampled:
            return False
        tracker.sampled = state
        cleaned = clean_progress(*state) if isinstance(state, tuple) and len(state) == 3 else None
        if cleaned is None:
            return False  # garbage from a handler: keep the last good state
        tracker.progress, tracker.message = cleaned
        tracker.eta = tracker.rate.eta(self._monotonic(), tracker.progress)
        tracker.dirty = True
        return True

    # -- building and publishing --------------------------------------------------------------

    def _job_event(self, job: Job, tracker: JobTracker | None) -> JobProgressEvent:
        if tracker is None or tracker.progress is None:
            return job_event(job, self._clock())
        return job_event(job, self._clock(), tracker.progress, tracker.message, tracker.eta)

    def _batch_event(self, tracker: BatchTracker) -> JobProgressEvent:
        batch = tracker.batch
        current = tracker.current()
        running = sum(min(job.progress.percentage or 0.0, 100.0) / 100
                      for job in tracker.running.values() if job.progress is not None)
        done = batch.finished + running
        eta = None
        if batch.started_at is not None and 0 < done < batch.total:
            elapsed = self._clock() - batch.started_at
            eta = round(elapsed / done * (batch.total - done), 1)
        return batch_event(
            batch, self._clock(),
            current_operation=None if current is None else current.job.name,
            message=None if current is None else current.message,
            eta_seconds=eta,
            running_work=running,
        )

    def _publish(self, subject: str, build: Callable[[], JobProgressEvent]) -> None:
        targeted = self._by_id.get(subject)
        if not self._all and not targeted:
            return  # nobody listens: skip building the event
        event = build()
        for subscription in (*self._all, *(targeted or ())):
            subscription.offer(event)


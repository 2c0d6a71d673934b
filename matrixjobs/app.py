"""The service: wires config → store → queue and workers → monitor, then the interfaces.

`App` is also the core's public face. Interfaces (Matrix, HTTP API, MCP) get
the App and call `submit`, `submit_batch`, `rerun`, `cancel`, `status`, `watch`, `jobs`,
`batches`, the `log` family and `scrape_metrics`, and count what they do on `metrics`;
the bot keeps its progress messages and login through `save_message`, `setting` and the
like. They never reach into the store or queue themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import ParamSpec, Protocol, TypeVar

from prometheus_client import CollectorRegistry

from matrixjobs import __version__
from matrixjobs.audit import SERVICE, AuditAction, AuditQuery, Entry, Record, Verdict, verify
from matrixjobs.config import APPROVERS_DIFFER, USER_RE, Config, ScheduleConfig, approvers_differ
from matrixjobs.errors import (
    AlreadyFinishedError,
    AlreadySubmittedError,
    BadArgumentsError,
    BadBatchError,
    ForbiddenError,
    GroupBusyError,
    MatrixJobsError,
    NotAwaitingApprovalError,
    NotFoundError,
    StoreUnavailableError,
    TargetGoneError,
    UnknownTargetError,
    echo,
)
from matrixjobs.logs import mask, redact
from matrixjobs.metrics import Metrics
from matrixjobs.models import (
    BATCH_PREFIX,
    HELD_UNTIL,
    JOB_PREFIX,
    Approval,
    Batch,
    Job,
    JobSpec,
    PersonalToken,
    ProgressMessage,
    ScheduleState,
    Status,
    Trigger,
    Worker,
    parse_id,
)
from matrixjobs.policy import Action, Caller, Policy, Via
from matrixjobs.progress.events import JobProgressEvent, event_of
from matrixjobs.progress.monitor import ProgressMonitor
from matrixjobs.progress.wording import STATUS_WORD, approval_state
from matrixjobs.queue.command import CommandHandler
from matrixjobs.queue.containment import choose_runner, describe, shared_state
from matrixjobs.queue.handlers import HandlerRegistry, load_user_handlers
from matrixjobs.queue.joblog import JobLogs, tail
from matrixjobs.queue.queue import JobQueue
from matrixjobs.queue.remote import RemoteFeed
from matrixjobs.scheduler import Scheduler
from matrixjobs.schedules import ScheduleInfo, schedule_info
from matrixjobs.store import Store, create_store, describe_store
from matrixjobs.store.health import RETRY_AFTER_S, StoreFault, StoreHealth
from matrixjobs.supervisor import Supervisor
from matrixjobs.targets import COMMAND_TYPE, Targets

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

RETENTION_SWEEP_S = 3600.0
ACTIVE = (Status.PENDING, Status.PROCESSING)
ACTIVE_LIMIT = 1000
# How often a follow of a job that is not running looks at the store again, in case its
# run started and ended in between.
FOLLOW_RECHECK_S = 1.0
# How often a follow looks again for the outcome of a run that ended here (it is committed
# within the queue's next cycle, a few milliseconds).
SETTLE_RECHECK_S = 0.01
WORKERS_CACHE_S = 2.0
# How much of a log cut meanwhile a follower of another process's job sees again.
REFOLLOW_CHARS = 4096
# How often the store is probed for writes (a fault shows, and its end, within two of these).
STORE_PROBE_S = 5.0
# How long the probe's write may take on PostgreSQL: a server that cannot be reached would
# hold it for the pool's wait (30 s). SQLite's own busy timeout (5 s) bounds it there.
STORE_PROBE_TIMEOUT_S = 4.0
# How often work held for approval is checked for expiry (and for a denial whose cancel a
# crash cut short).
APPROVAL_SWEEP_S = 5.0
# Personal tokens: the prefix says what a leaked one is (secret scanners key on it).
TOKEN_PREFIX = "mjp_"
TOKEN_NAME = re.compile(r"[A-Za-z0-9._-]{1,40}")
# How much of the audit chain's head hash the log shows.
HEAD_SHOWN = 16
# A denial's reason, as long as it may be shown.
MAX_REASON = 200
# Tries at recording an approval that others keep changing at the same moment.
APPROVAL_TRIES = 5
PROBE_SETTING = "health.probe"
# How often a process that shares its store saves its jobs' logs, for followers elsewhere.
LOG_SAVE_S = 2.0


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
        role: str = "run",
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock`: the wall clock schedules follow (tests move one of their own)."""
        self.config = config
        self._clock = clock
        self.role = role  # "run" (the service) or "worker" (`matrixjobs worker`)
        self.targets = Targets(config.targets)
        self.policy = Policy(config.access, config.targets)
        self.handlers = handlers or HandlerRegistry()
        self._commands = CommandHandler(self.targets, config.queue.limits,
                                        config.queue.kill_grace_s)
        self.handlers.register(COMMAND_TYPE, self._commands)
        load_user_handlers(config, self.handlers)
        self.store = store or create_store(config.store)
        self.store.claims_groups = any(target.concurrency for target in config.targets.values())
        self.metrics = Metrics(self.targets.names())
        self.monitor = ProgressMonitor(config.progress.interval_ms, observers=[self.metrics])
        self.job_logs = JobLogs(config.logs.max_bytes, redact)
        self.health = StoreHealth()
        self._store_patient = True  # see _be_patient
        self.queue = JobQueue(self.store, self.monitor, self.handlers, config.queue,
                              self.job_logs, config.worker, health=self.health)
        # Only nodes with interfaces show other processes' jobs; a worker has no one to tell.
        self.remote = (RemoteFeed(self.store, self.monitor, self.queue)
                       if self.store.shared and role == "run" else None)
        if self.remote is not None:
            self.monitor.observe(self.remote)
        # Every node runs the schedules: the store makes each slot start its work once.
        self.scheduler = (Scheduler(config.schedules, self.store, self.trigger, clock)
                          if config.schedules else None)
        self.components: list[Component] = []
        self._supervisor = Supervisor()
        self._workers_cache: tuple[float, list[Worker]] | None = None
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.open()
        try:
            if self.config.queue.workers > 0:
                await self._contain()  # before recovery can start jobs
            await self.queue.start()
        except BaseException:
            await self.store.close()
            raise
        self._started = True
        if self.config.queue.workers > 0:
            await self.store.register_worker(self._worker_row())
        await self._record_service(AuditAction.SERVICE_STARTED)
        self._supervisor.keep("progress-monitor", self.monitor.run)
        self._supervisor.every("lease-heartbeat", self.config.queue.lease_s / 3,
                               self.queue.heartbeat)
        self._supervisor.every("retention", RETENTION_SWEEP_S, self.purge)
        self._supervisor.every("store-probe", STORE_PROBE_S, self._probe_store)
        if self.role == "run":
            await self.end_approvals()  # what expired while the service was down
            self._supervisor.once("superseded-left", self._supersede_left)
            self._supervisor.every("approvals", APPROVAL_SWEEP_S, self.end_approvals)
        if self.scheduler is not None:
            self._supervisor.keep("schedules", self.scheduler.run)
        listen = self.store.listen(self._announced, self._missed_news)
        if listen is not None:
            self._supervisor.keep("listener", listen)
        if self.remote is not None:
            self._supervisor.keep("remote-feed", self.remote.run)
        if self.store.shared:
            self._supervisor.every("lease-recovery", self.config.queue.lease_s / 3,
                                   self.queue.recover_expired)
            if self.config.queue.workers:
                self._supervisor.every("progress-flush",
                                       self.config.progress.interval_ms / 1000,
                                       self.queue.flush_progress)
                self._supervisor.every("log-flush", LOG_SAVE_S, self.queue.flush_logs)
        await self.purge()
        for component in self.components:
            await component.start()
        log.info("matrixjobs started (%s): store %s, %d workers, targets: %s", self.role,
                 describe_store(self.config.store), self.config.queue.workers,
                 ", ".join(self.targets.names()) or "none")

    async def _contain(self) -> None:
        """Choose how jobs are contained (ConfigError if a limit cannot be kept) and say it."""
        runner = await asyncio.to_thread(choose_runner, self.config)
        self._commands.runner = runner
        log.info("jobs are contained by %s", runner.enforcement.mechanism)
        for key, how in describe(runner):
            log.info("  %s: %s", key, how)
        for warning in runner.enforcement.warnings:
            log.warning("%s", warning)
        for line in shared_state(self.config, runner):
            log.info("%s", line)

    def _announced(self, kind: str, ids: list[str]) -> None:
        """News from another process sharing the store."""
        if kind == "cancel":
            for job_id in ids:
                self.queue.cancel_here(job_id)
            return
        if kind == "new":
            self.queue.wake()
        if self.remote is not None:
            self.remote.changed(ids)

    def _missed_news(self) -> None:
        """The listener was deaf for a while: look at everything again."""
        self.queue.wake()
        if self.remote is not None:
            self.remote.resync()
        self._supervisor.once("heartbeat", self.queue.heartbeat)  # cancels it missed

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
        # Last, once no heartbeat can write the row again.
        await self._unregister_worker()
        await self._record_service(AuditAction.SERVICE_STOPPED)
        await self.store.close()
        log.info("matrixjobs stopped")

    async def _record_service(self, action: AuditAction) -> None:
        """Record the service's start or stop, with a hash of its config (secrets are
        masked in it), and log the chain's head: a copy of these lines kept elsewhere
        pins what the audit log was."""
        config = hashlib.sha256(self.config.model_dump_json().encode()).hexdigest()
        entry = Entry(action, SERVICE, SERVICE, detail={
            "role": self.role, "worker": self.config.worker.name, "version": __version__,
            "config": config})
        try:
            record = await self.store.append_audit(entry)
        except Exception as exc:  # a store in trouble: starting or stopping goes on
            log.error("audit: the service's %s could not be recorded: %s", action, exc)
            return
        # 64 bits of the hash pin the chain (forging a match takes 2**64 tries) and read
        # as no key would (the log is checked for key-like blobs).
        log.info("audit: %s; the chain's head is record %d, sha256 %s…", action, record.seq,
                 record.hash[:HEAD_SHOWN])

    def _worker_row(self) -> Worker:
        now = time.time()
        return Worker(id=self.queue.owner, name=self.config.worker.name,
                      host=socket.gethostname(), pid=os.getpid(), role=self.role,
                      labels=self.config.worker.labels, slots=self.config.queue.workers,
                      version=__version__, started_at=now, heartbeat_at=now)

    async def _unregister_worker(self) -> None:
        if self.config.queue.workers == 0:
            return
        try:
            await self.store.unregister_worker(self.queue.owner)
        except Exception as exc:  # the stop goes on; the row turns silent and is purged
            log.warning("could not remove this worker's row (%s): others will see it "
                        "as silent until retention removes it", type(exc).__name__)

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
        now = time.time()
        removed = await self.store.purge_finished(now - self.config.store.retention_days * 86400)
        if removed:
            log.info("retention: removed %d finished jobs/batches", removed)
        pruned = await self.store.prune_audit(now - self.config.audit.retention_days * 86400)
        if pruned:
            log.info("retention: removed the %d oldest audit records", pruned)

    # -- the core's public API -------------------------------------------------------------------

    async def submit(
        self, target: str, args: Sequence[str] = (), dedupe_key: str | None = None,
        show: ProgressMessage | None = None, caller: Caller | None = None,
    ) -> Job:
        """Queue a configured target. `dedupe_key` makes a repeated request raise
        AlreadySubmittedError; `show` records where its progress will be shown; `caller`
        says who asked, from where (None: the core itself, no rule applies)."""
        await self._allow(caller, Action.RUN, [target])
        spec = self.targets.spec(target, list(args), _requester(caller))
        audit = _entry(caller, AuditAction.STARTED, target, {"args": list(spec.data["args"])})
        [job] = await self._enqueue([spec], dedupe_key, show, audit)
        return job

    async def _enqueue(self, specs: Sequence[JobSpec], dedupe_key: str | None,
                       show: ProgressMessage | None, audit: Entry | None) -> list[Job]:
        await self._group_free(specs, dedupe_key, audit)
        with self._storing():
            jobs = await self.queue.enqueue_many(specs, dedupe_key, show, audit)
        self._queued(jobs, audit, held=_held(jobs[0].approval) if jobs else False)
        return jobs

    async def _enqueue_batch(self, name: str, specs: Sequence[JobSpec], dedupe_key: str | None,
                             show: ProgressMessage | None, audit: Entry | None) -> Batch:
        await self._group_free(specs, dedupe_key, audit)
        with self._storing():
            batch, jobs = await self.queue.enqueue_batch(name, specs, dedupe_key, show, audit)
        self._queued(jobs, audit, held=_held(batch.approval))
        return batch

    def _queued(self, jobs: Sequence[Job], audit: Entry | None, held: bool) -> None:
        """`held`: waiting for approval, which supersedes nothing until it is granted (or
        anyone who may ask for a target could stop everyone else's running job of it)."""
        if self.remote is not None:
            self.remote.follow(jobs)  # another process may run them
        if not held:
            self._supersede_older(jobs, audit)

    def _supersede_older(self, jobs: Sequence[Job], audit: Entry | None) -> None:
        for job in jobs:
            if job.concurrency is not None and self._on_busy(job) == "cancel-older":
                self._supervisor.once(f"supersede {job.id}",
                                      functools.partial(self._supersede, job, audit))

    def _on_busy(self, job: Job | JobSpec) -> str:
        target = self.config.targets.get(str(job.data.get("target")))
        return "queue" if target is None else target.on_busy

    async def _group_free(self, specs: Sequence[JobSpec], dedupe_key: str | None,
                          audit: Entry | None) -> None:
        """Refuse new work whose concurrency group has work, where on_busy says "skip",
        and record the refusal with `audit`'s who and where. (Two nodes asked at the same
        moment may both queue one: they still never run at once.) A repeat of
        `dedupe_key` answers with what it started, as any repeat does: the group is likely
        busy with that very work."""
        for spec in specs:
            if spec.concurrency is None or self._on_busy(spec) != "skip":
                continue
            busy = await self._read(self.store.group_jobs, spec.concurrency)
            if busy:
                if dedupe_key is not None:
                    used, subject = await self._read(self.store.key_subject, dedupe_key)
                    if used:
                        raise AlreadySubmittedError(dedupe_key, subject)
                reason = (f"{spec.concurrency} is busy: {busy[0].id} is "
                          f"{STATUS_WORD[busy[0].status]}; not started")
                await self._record_refusal(None if audit is None else replace(
                    audit, action=AuditAction.REFUSED, subject=None, detail={
                        "action": str(Action.RERUN if audit.action is AuditAction.RERUN
                                      else Action.RUN),
                        "rule": "concurrency", "reason": reason}))
                raise GroupBusyError(reason)

    async def _supersede_left(self) -> None:
        """Cancel what a stop between queueing a cancel-older job and its cancels (which
        follow in a task of their own) left queued or running before it; recorded as
        the service's doing."""
        for group in await self._read(self.store.active_groups):
            newest = max((job for job in await self._read(self.store.group_jobs, group)
                          if job.run_after < HELD_UNTIL), key=lambda job: int(job.id[1:]),
                         default=None)
            if newest is not None and self._on_busy(newest) == "cancel-older":
                await self._supersede(newest, Entry(AuditAction.CANCELLED, SERVICE, SERVICE))

    async def _supersede(self, job: Job, audit: Entry | None) -> None:
        """Cancel the running and queued jobs of `job`'s group that came before it (GitHub's
        cancel-in-progress); recorded as the new job's requester's doing."""
        assert job.concurrency is not None
        older = [other for other in await self._read(self.store.group_jobs, job.concurrency)
                 if int(other.id[1:]) < int(job.id[1:])
                 and (other.batch_id is None or other.batch_id != job.batch_id)]
        for other in older:
            log.info("%s cancels %s: both are in concurrency group %s", job.id, other.id,
                     job.concurrency)
            record = None if audit is None else replace(
                audit, action=AuditAction.CANCELLED, subject=other.id,
                target=_target(other) or None, detail={"superseded_by": job.id})
            with contextlib.suppress(AlreadyFinishedError, NotFoundError):
                await self.queue.cancel(other.id, record)

    @contextlib.contextmanager
    def _storing(self) -> Iterator[None]:
        """New work goes to the store only while it takes writes; a write that fails with a
        store fault says so (StoreUnavailableError), never as an internal error."""
        if not self.health.up:
            log.debug("refusing new work: %s", self.health.reason)
            raise StoreUnavailableError(self._unavailable())
        try:
            yield
        except MatrixJobsError:
            raise
        except Exception as exc:
            if self.health.failed(exc) is None:
                raise
            raise StoreUnavailableError(self._unavailable()) from None

    def _unavailable(self) -> str:
        return (f"{self.health.reason}: new jobs are refused until it recovers; "
                f"try again in {RETRY_AFTER_S} s")

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[None]:
        """Every read an interface asks for goes through here. A read that fails with a
        store fault notes it and says so (StoreUnavailableError "store: unreachable; try
        again in 10 s"), never as an internal error. Reads go on while writes cannot (a
        locked or full SQLite store). A store that cannot be reached would hold each read
        for the pool's wait (30 s): while it is known to be unreachable reads are answered
        at once, until the probe finds it again, and a read already waiting gives up the
        moment the probe (or any other operation) finds it unreachable."""
        if self.health.fault is StoreFault.UNREACHABLE:
            raise StoreUnavailableError(self._unreadable(self.health.reason))
        loop = asyncio.get_running_loop()
        deadline = asyncio.timeout(None)
        try:
            async with deadline:
                with self.health.until_unreachable(lambda: deadline.reschedule(loop.time())):
                    yield
        except MatrixJobsError:
            raise
        except Exception as exc:
            fault = StoreFault.UNREACHABLE if deadline.expired() else self.health.failed(exc)
            if fault is None:
                raise
            raise StoreUnavailableError(self._unreadable(f"store: {fault}")) from None

    async def _read(self, read: Callable[P, Awaitable[T]], *args: P.args,
                    **kwargs: P.kwargs) -> T:
        """One store read, through `_reading`."""
        async with self._reading():
            return await read(*args, **kwargs)

    @staticmethod
    def _unreadable(reason: str) -> str:
        return f"{reason}; try again in {RETRY_AFTER_S} s"

    async def _probe_store(self) -> None:
        """Whether the store takes writes: the free space where a SQLite store is, then a
        small real write. Only this clears a fault (a write elsewhere may succeed while
        the disk stays below the floor)."""
        store = self.config.store
        if store.backend == "sqlite":
            free = await asyncio.to_thread(_free_bytes, store.path.parent)
            floor = store.min_free_mb * 1024**2
            if free is not None and free < floor:
                self.health.down(StoreFault.DISK_FULL, f"{free / 1024**2:.0f} MiB free, below "
                                 f"[store] min_free_mb = {store.min_free_mb:g}")
                return
        await self._be_patient(self.health.up)
        bound = None if store.backend == "sqlite" else STORE_PROBE_TIMEOUT_S
        try:
            async with asyncio.timeout(bound):
                await self.store.set_setting(PROBE_SETTING, f"{time.time():.3f}")
        except Exception as exc:
            if self.health.failed(exc) is None:
                raise  # not the store's fault: the supervisor logs it
            return
        self.health.worked()
        await self._be_patient(True)

    async def _be_patient(self, patient: bool) -> None:
        """While the store is unavailable its writes give up at once (Store.set_patience):
        the dispatcher's retries and the probe would otherwise hold SQLite's one connection
        for its whole busy timeout each, and every read (`!status`, the dashboard) behind
        them. Once the probe's write works again, writes wait as before."""
        if patient != self._store_patient:
            await self.store.set_patience(patient)
            self._store_patient = patient
            log.debug("store writes %s", "wait out a busy store again" if patient
                      else "give up at once while the store is unavailable")

    async def submit_batch(
        self, targets: Sequence[str], name: str | None = None, dedupe_key: str | None = None,
        show: ProgressMessage | None = None, caller: Caller | None = None,
    ) -> Batch:
        await self._allow(caller, Action.RUN, targets)
        self._one_approval(targets)
        specs = [self.targets.spec(target, requester=_requester(caller)) for target in targets]
        name = name or " ".join(targets)
        audit = _entry(caller, AuditAction.STARTED, " ".join(targets), {"name": name})
        return await self._enqueue_batch(name, specs, dedupe_key, show, audit)

    async def trigger(
        self, trigger: Trigger, *, target: str | None = None, batch: Sequence[str] = (),
        args: Sequence[str] = (), room: str | None = None, dedupe_key: str | None = None,
    ) -> Job | Batch:
        """Start what a webhook or schedule names: one target with `args`, or a batch.
        The operator configured the trigger, so no who-may rule applies; approvals do.
        `room` (an id or alias): where the bot posts its progress message. A repeated
        `dedupe_key` raises AlreadySubmittedError naming the work it started."""
        caller = Caller(trigger.requester, Via(trigger.kind))
        show = None if room is None else ProgressMessage("", room, None, trigger.requester, "")
        if target is not None:
            spec = replace(self.targets.spec(target, list(args), trigger.requester),
                           trigger=trigger)
            audit = _entry(caller, AuditAction.STARTED, target,
                           {"args": list(spec.data["args"]), **_cause(trigger)})
            [job] = await self._enqueue([spec], dedupe_key, show, audit)
            return job
        self._one_approval(batch)
        specs = [replace(self.targets.spec(name, requester=trigger.requester), trigger=trigger)
                 for name in batch]
        name = " ".join(batch)
        audit = _entry(caller, AuditAction.STARTED, name, {"name": name, **_cause(trigger)})
        return await self._enqueue_batch(name, specs, dedupe_key, show, audit)

    def _one_approval(self, targets: Sequence[str]) -> None:
        if approvers_differ(self.config.targets, targets):
            raise BadBatchError(f"{APPROVERS_DIFFER}; start them separately")

    async def rerun(
        self, subject: str, caller: Caller | None = None, dedupe_key: str | None = None,
        show: ProgressMessage | None = None,
    ) -> Job | Batch:
        """Queue a job's target again with the same arguments (one operation of a batch
        reruns alone), or a batch's operations as a new batch; checked against today's
        targets. Running ones too: a rerun is the same submit anyone allowed could type."""
        subject = _canonical(subject)
        if subject.startswith(BATCH_PREFIX):
            async with self._reading():
                batch = await self.store.get_batch(subject)
                if batch is None:
                    raise NotFoundError(f"no batch {subject}")
                operations = await self.store.list_jobs(batch_id=subject, limit=batch.total)
            targets = [_target(job) for job in reversed(operations)]
            await self._allow(caller, Action.RERUN, targets)
            self._one_approval(targets)
            specs = [self._again(job, caller) for job in reversed(operations)]
            audit = _entry(caller, AuditAction.RERUN, " ".join(targets), {"of": subject})
            return await self._enqueue_batch(batch.name, specs, dedupe_key, show, audit)
        job = await self._read(self.store.get_job, subject)
        if job is None:
            raise NotFoundError(f"no job {subject}")
        await self._allow(caller, Action.RERUN, [_target(job)])
        spec = self._again(job, caller)
        audit = _entry(caller, AuditAction.RERUN, _target(job),
                       {"of": subject, "args": list(spec.data["args"])})
        [rerun_job] = await self._enqueue([spec], dedupe_key, show, audit)
        return rerun_job

    def _again(self, job: Job, caller: Caller | None) -> JobSpec:
        target, args = job.data.get("target"), job.data.get("args", [])
        if not isinstance(target, str) or not isinstance(args, list):
            raise MatrixJobsError(f"cannot rerun {job.id}: it did not run a configured target")
        try:
            return self.targets.spec(target, args, _requester(caller))
        except UnknownTargetError:
            raise TargetGoneError(job.id, target, self.targets.names()) from None
        except BadArgumentsError as exc:
            raise BadArgumentsError(f"cannot rerun {job.id}: {exc}") from None

    async def previous_outcome(self, subject: str) -> Status | None:
        """How the same work (same target and arguments; a batch: same name) ended the
        last time before `subject` finished, cancelled runs skipped."""
        return await self._read(self.store.previous_outcome, subject)

    async def shown_by(self, room_id: str, event_id: str) -> str | None:
        """The job or batch whose progress message is `event_id` in `room_id`."""
        return await self._read(self.store.message_subject, room_id, event_id)

    async def cancel(self, subject: str, caller: Caller | None = None) -> Job | Batch:
        targets = [] if caller is None else await self._allow_on(caller, Action.CANCEL, subject)
        audit = _entry(caller, AuditAction.CANCELLED, " ".join(targets),
                       subject=_canonical(subject))
        return await self.queue.cancel(subject, audit)

    async def _allow(self, caller: Caller | None, action: Action, targets: Sequence[str],
                     owner: str | None = None, subject: str | None = None) -> None:
        """Raise ForbiddenError if a rule refuses `caller` (None: the core itself), and
        record the refusal."""
        if caller is None:
            return
        caller = await caller.located(targets)
        decision = self.policy.decide(caller, action, targets, owner)
        if decision:
            return
        log.debug("policy: %s refused to %s via %s on %s (rule %s: %s)", action,
                  caller.user, caller.via, ", ".join(targets) or "-", decision.rule,
                  decision.reason)
        await self._record_refusal(_entry(caller, AuditAction.REFUSED, " ".join(targets), {
            "action": str(action), "rule": decision.rule, "reason": decision.reason}, subject))
        raise ForbiddenError(decision.reason, decision.rule)

    async def _record_refusal(self, refused: Entry | None) -> None:
        if refused is None:
            return
        try:
            await self.store.append_audit(refused)
        except Exception as exc:  # the refusal stands; only its record is lost
            log.error("audit: the refusal of %s could not be recorded: %s", refused.actor, exc)

    async def refused_stranger(self, caller: Caller, command: str) -> None:
        """Record that someone no rule knows asked for something (the room says ⛔)."""
        await self._record_refusal(_entry(caller, AuditAction.REFUSED, "", {
            "command": command, "rule": "allowed_users",
            "reason": "not in [access] allowed_users or any target's allowed_users or "
                      "approvers"}))

    async def _allow_on(self, caller: Caller, action: Action, subject: str) -> list[str]:
        """`_allow` for existing work: its targets, and who started it. Unknown ids pass
        here and get their own answer from the step that looks them up. Returns the
        targets."""
        subject = _canonical(subject)
        if subject.startswith(BATCH_PREFIX):
            async with self._reading():
                batch = await self.store.get_batch(subject)
                if batch is None:
                    return []
                operations = await self.store.list_jobs(batch_id=subject, limit=batch.total)
            targets = [_target(job) for job in reversed(operations)]
            await self._allow(caller, action, targets, batch.requester, subject)
            return targets
        job = await self._read(self.store.get_job, subject)
        if job is None:
            return []
        await self._allow(caller, action, [_target(job)], job.requester, subject)
        return [_target(job)]

    # -- schedules -----------------------------------------------------------------------------

    async def schedules(self) -> list[ScheduleInfo]:
        """Every configured schedule, by name, as it stands on every node."""
        async with self._reading():
            states = {state.name: state for state in await self.store.schedule_states()}
            now = self._clock()
            return [schedule_info(name, config, states.get(name),
                                  await self._last_work(states.get(name)), now)
                    for name, config in sorted(self.config.schedules.items())]

    async def schedule(self, name: str) -> ScheduleInfo:
        config = self._schedule_config(name)
        async with self._reading():
            state = next((state for state in await self.store.schedule_states()
                          if state.name == name), None)
            return schedule_info(name, config, state, await self._last_work(state),
                                 self._clock())

    async def _last_work(self, state: ScheduleState | None) -> Job | Batch | None:
        subject = None if state is None else state.last_job
        if subject is None:
            return None
        if subject.startswith(BATCH_PREFIX):
            return await self.store.get_batch(subject)
        return await self.store.get_job(subject)

    async def pause_schedule(self, name: str, caller: Caller) -> ScheduleInfo:
        """Hold a schedule's slots on every node until it is resumed. Pausing what is
        paused changes nothing (and records nothing)."""
        return await self._pause(name, caller, paused=True)

    async def resume_schedule(self, name: str, caller: Caller) -> ScheduleInfo:
        """Let a paused schedule go on from its next slot: the slots the pause held back
        do not run."""
        return await self._pause(name, caller, paused=False)

    async def _pause(self, name: str, caller: Caller, paused: bool) -> ScheduleInfo:
        config = self._schedule_config(name)
        await self._allow(caller, Action.SCHEDULE, config.starts())
        action = AuditAction.SCHEDULE_PAUSED if paused else AuditAction.SCHEDULE_RESUMED
        audit = _entry(caller, action, " ".join(config.starts()), {"schedule": name})
        assert audit is not None
        passed = config.when.latest_at(self._clock())
        with self._storing():
            changed = await self.store.pause_schedule(name, caller.user if paused else None,
                                                      passed, audit)
        if changed:
            log.info("schedule %s: %s by %s via %s", name, action, caller.user, caller.via)
            if self.scheduler is not None:
                self.scheduler.wake()
        return await self.schedule(name)

    def _schedule_config(self, name: str) -> ScheduleConfig:
        config = self.config.schedules.get(name)
        if config is None:
            raise NotFoundError(f"no schedule '{echo(name)}' (configured: "
                                f"{', '.join(sorted(self.config.schedules)) or 'none'})")
        return config

    # -- the audit log -------------------------------------------------------------------------

    async def audit(self, query: AuditQuery) -> list[Record]:
        return await self._read(self.store.audit_records, query)

    async def verify_audit(self) -> Verdict:
        records, head = await self._read(self.store.audit_chain)
        return verify(records, head)

    # -- personal tokens -------------------------------------------------------------------------

    async def issue_token(self, user: str, name: str, caller: Caller) -> str:
        """A new personal token for `user`, returned this once (only its digest is kept)."""
        if not TOKEN_NAME.fullmatch(name):
            raise BadArgumentsError("a token's name is 1 to 40 letters, digits, '.', '_' or "
                                    "'-'")
        if not USER_RE.match(user):
            raise BadArgumentsError(f"'{echo(user)}' is not a Matrix user id")
        await self._allow(caller, Action.TOKEN, [], user)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        mask([token])
        audit = _entry(caller, AuditAction.TOKEN_ISSUED, "", {"user": user, "name": name})
        assert audit is not None
        with self._storing():
            await self.store.add_token(token_digest(token),
                                       PersonalToken(user, name, time.time()), audit)
        log.info("tokens: issued %s's token %s (asked by %s via %s)", user, name,
                 caller.user, caller.via)
        return token

    async def tokens(self, caller: Caller) -> list[PersonalToken]:
        """The caller's own tokens; the service token's: everyone's."""
        await self._allow(caller, Action.TOKEN, [], None if caller.admin else caller.user)
        return await self._read(self.store.list_tokens, None if caller.admin else caller.user)

    async def revoke_token(self, user: str, name: str, caller: Caller) -> None:
        await self._allow(caller, Action.TOKEN, [], user)
        audit = _entry(caller, AuditAction.TOKEN_REVOKED, "", {"user": user, "name": name})
        assert audit is not None
        with self._storing():
            if not await self.store.revoke_token(user, name, audit):
                raise NotFoundError(f"{echo(user)} has no token named {echo(name)}")
        log.info("tokens: revoked %s's token %s (asked by %s via %s)", user, name,
                 caller.user, caller.via)

    async def token_owner(self, token: str) -> str | None:
        """Whose personal token this is (None: nobody's, or revoked). Read each time, so a
        revoked token stops working at once on every node."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        owner = await self._read(self.store.token_owner, token_digest(token))
        if owner is not None:
            mask([token])  # issued elsewhere or before a restart: masked from now on
        return owner

    # -- approvals -----------------------------------------------------------------------------

    async def approve(self, subject: str, caller: Caller) -> Job | Batch:
        """Count `caller`'s approval of held work (once per person); the last one needed
        releases it to run. Returns it as it is now."""
        return await self._judge(subject, caller, lambda approval: approval.approved(
            caller.user), approving=True)

    async def deny(self, subject: str, caller: Caller, reason: str | None = None) -> Job | Batch:
        """Refuse held work: it is cancelled, and shows who denied it and why."""
        # Shown in the room and the dashboard: printable characters only.
        reason = "".join(c for c in reason or "" if c.isprintable()).strip()[:MAX_REASON] or None
        item = await self._judge(subject, caller, lambda approval: approval.denied(
            caller.user, reason), approving=False)
        return await self.queue.cancel(item.id)

    async def _judge(self, subject: str, caller: Caller,
                     change: Callable[[Approval], Approval], approving: bool) -> Job | Batch:
        subject = _canonical(subject)
        for _ in range(APPROVAL_TRIES):
            item, targets = await self._held(subject)
            approval = item.approval
            assert approval is not None
            await self._allow(caller, Action.APPROVE, targets, item.requester, subject)
            if approving and caller.user in approval.approved_by:
                return item  # counted once
            after = change(approval)
            release = time.time() if after.granted else None
            action = AuditAction.DENIED if after.denied_by else AuditAction.APPROVED
            audit = _entry(caller, action, " ".join(targets), {
                "approvals": f"{len(after.approved_by)}/{after.required}",
                **({"reason": after.reason} if after.reason else {})}, subject)
            with self._storing():
                if await self.store.set_approval(subject, approval, after, release, audit):
                    log.info("%s: %s by %s via %s (%d/%d)", subject,
                             "denied" if after.denied_by else "approved", caller.user,
                             caller.via, len(after.approved_by), after.required)
                    return await self._approval_changed(subject, after.granted, audit)
        raise MatrixJobsError(f"{subject} is being approved by others right now; try again")

    async def _held(self, subject: str) -> tuple[Job | Batch, list[str]]:
        """Work waiting for approval, and its targets; else a clear error."""
        item: Job | Batch | None
        async with self._reading():
            if subject.startswith(BATCH_PREFIX):
                item = await self.store.get_batch(subject)
                jobs = [] if item is None else await self.store.list_jobs(batch_id=subject,
                                                                         limit=item.total)
            else:
                item = await self.store.get_job(subject)
                jobs = [] if item is None else [item]
        if item is None:
            raise NotFoundError(f"no {'batch' if subject[0] == BATCH_PREFIX else 'job'} "
                                f"{subject}")
        approval = item.approval
        if approval is not None and approval.waiting and approval.expires_at <= time.time():
            # The sweep has not marked it yet (it runs every few seconds, and once at start).
            approval = replace(approval, expired=True)
        if approval is not None and not approval.waiting:
            raise NotAwaitingApprovalError(f"{subject} is already {approval_state(approval)}")
        if approval is None or item.status is not Status.PENDING:
            raise NotAwaitingApprovalError(f"{subject} is not waiting for approval")
        return item, [_target(job) for job in jobs]

    async def _approval_changed(self, subject: str, released: bool,
                                audit: Entry | None) -> Job | Batch:
        """Show work whose approval changed (released work is claimed at once, and only
        now cancels the older jobs of its group where on_busy says "cancel-older")."""
        if subject.startswith(BATCH_PREFIX):
            batch = await self._read(self.store.get_batch, subject)
            assert batch is not None
            self.monitor.batch_updated(batch)
            if released:
                self._supersede_older(await self._read(
                    self.store.list_jobs, batch_id=subject, limit=batch.total), audit)
            self.queue.wake()
            return batch
        job = await self._read(self.store.get_job, subject)
        assert job is not None
        self.monitor.job_queued(job)
        if released:
            self._supersede_older([job], audit)
        self.queue.wake()
        return job

    async def end_approvals(self) -> None:
        """Cancel held work whose approval expired, or was denied but not yet cancelled
        (a crash between the two)."""
        now = time.time()
        for subject, approval in await self.store.awaiting_approval():
            if approval.waiting and approval.expires_at <= now:
                expired = replace(approval, expired=True)
                audit = Entry(AuditAction.EXPIRED, SERVICE, SERVICE, subject, detail={
                    "approvals": f"{len(approval.approved_by)}/{approval.required}"})
                if not await self.store.set_approval(subject, approval, expired, None, audit):
                    continue  # approved or denied this very moment
                log.info("%s: approval expired (%d/%d)", subject, len(approval.approved_by),
                         approval.required)
            elif approval.waiting:
                continue
            with contextlib.suppress(AlreadyFinishedError, NotFoundError):
                await self.queue.cancel(subject)

    async def status(self, subject: str) -> JobProgressEvent:
        """The current state of a job or batch, live if it is running."""
        subject = _canonical(subject)
        live = self.monitor.current(subject)
        if live is not None:
            return live
        async with self._reading():
            if subject.startswith(BATCH_PREFIX):
                batch = await self.store.get_batch(subject)
                if batch is None:
                    raise NotFoundError(f"no batch {subject}")
                return event_of(batch, time.time())
            job = await self.store.get_job(subject)
            if job is None:
                raise NotFoundError(f"no job {subject}")
            return await self._explained(job, event_of(job, time.time()))

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
        async with self._reading():
            batches = await self.store.list_batches(ACTIVE, limit=limit)
            jobs = [job for job in await self.store.list_jobs(ACTIVE, limit=limit)
                    if job.batch_id is None]
            running: dict[str, str | None] = {}  # one read a group, however many wait
            return [*(self.live(batch) for batch in batches),
                    *[await self._explained(job, self.live(job), running) for job in jobs]]

    async def log(self, job_id: str, caller: Caller | None = None) -> str:
        """A job's whole log as it stands ("" before its first output)."""
        job_id = _job_id(job_id)
        if caller is not None:
            await self._allow_on(caller, Action.LOGS, job_id)
        live = self.job_logs.live(job_id)
        if live is not None:
            return live.text()
        async with self._reading():
            text = await self.store.get_log(job_id)
            if text is None and await self.store.get_job(job_id) is None:
                raise NotFoundError(f"no job {job_id}")
        return text or ""

    async def log_tail(self, job_id: str, lines: int, max_bytes: int,
                       caller: Caller | None = None) -> str:
        """The last `lines` lines of a job's log, at most `max_bytes` of them (UTF-8)."""
        return tail(await self.log(job_id, caller), lines, max_bytes)

    async def follow_log(self, job_id: str, caller: Caller | None = None
                         ) -> AsyncIterator[str]:
        """A job's log, then its output as it comes, until the run going on (or the next
        one to start) ends. The first chunk comes at once (maybe empty): the job exists. A
        store in trouble meanwhile ends it with a last line that says so."""
        job_id = _job_id(job_id)
        if caller is not None:
            await self._allow_on(caller, Action.LOGS, job_id)
        if (self.job_logs.live(job_id) is None
                and await self._read(self.store.get_job, job_id) is None):
            raise NotFoundError(f"no job {job_id}")
        yield ""
        try:
            async for chunk in self._follow_run(job_id):
                yield chunk
        except StoreUnavailableError as exc:  # the stream has begun: no error answer now
            log.info("a follow of %s's log ended: %s", job_id, exc)
            yield f"\n[the follow ends here: {exc}]\n"

    async def _follow_run(self, job_id: str) -> AsyncIterator[str]:
        """`follow_log` once the job is known to exist."""
        while (live := self.job_logs.live(job_id)) is None:
            job = await self._read(self.store.get_job, job_id)
            if job is None or (job.status.terminal and self.job_logs.live(job_id) is None):
                yield await self._read(self.store.get_log, job_id) or ""
                return
            if self.store.shared and job.status == Status.PROCESSING:
                async for chunk in self._follow_stored(job_id):  # it runs on another process
                    yield chunk
                return
            if self.queue.settling(job_id):  # it ran while we read; its end is on the way
                await asyncio.sleep(SETTLE_RECHECK_S)
            elif self.job_logs.live(job_id) is None:  # it may have started during the read
                await self.job_logs.started(job_id, FOLLOW_RECHECK_S)
        text, follower = live.follow()
        try:
            yield text
            async for chunk in follower.chunks():
                yield chunk
        finally:
            live.unfollow(follower)

    async def _follow_stored(self, job_id: str) -> AsyncIterator[str]:
        """A log another process writes: what it saves (every LOG_SAVE_S), until the run
        ends there."""
        sent = ""
        while True:
            async with self._reading():
                job = await self.store.get_job(job_id)
                text = await self.store.get_log(job_id) or ""
            if text.startswith(sent):
                chunk = text[len(sent):]
            else:  # the log was cut to its head and tail meanwhile: go on from its end
                chunk = f"\n[… the log was cut; its last part follows]\n{text[-REFOLLOW_CHARS:]}"
            if chunk:
                yield chunk
            sent = text
            if job is None or job.status != Status.PROCESSING:
                return
            await asyncio.sleep(FOLLOW_RECHECK_S)

    async def jobs(
        self, statuses: Sequence[Status] | None = None, limit: int = 50, batch: str | None = None
    ) -> list[Job]:
        """Newest first; `batch` (an id like b3) keeps that batch's operations only."""
        batch_id = None if batch is None else _canonical(batch)
        if batch_id is not None and not batch_id.startswith(BATCH_PREFIX):
            raise NotFoundError(f"'{batch}' is not a batch id (like b3)")
        async with self._reading():
            return await self.store.list_jobs(statuses, batch_id=batch_id, limit=limit)

    async def batches(
        self, statuses: Sequence[Status] | None = None, limit: int = 50
    ) -> list[Batch]:
        async with self._reading():
            return await self.store.list_batches(statuses, limit=limit)

    async def workers(self) -> list[Worker]:
        """Every process that runs jobs from this store, silent ones too."""
        async with self._reading():
            return await self.store.list_workers()

    async def _explained(self, job: Job, event: JobProgressEvent,
                         running: dict[str, str | None] | None = None) -> JobProgressEvent:
        """A pending job that waits for its concurrency group, or that no live worker can
        take, says so in its message. `running`: each group's running job as read so far
        for the same answer."""
        if job.status != Status.PENDING or event.message is not None:
            return event
        reason = (await self._group_wait(job, {} if running is None else running)
                  or await self._worker_wait(job))
        return event if reason is None else event.model_copy(update={"message": reason})

    async def _group_wait(self, job: Job, running: dict[str, str | None]) -> str | None:
        group = job.concurrency
        if group is None:
            return None
        if group not in running:
            running[group] = next((other.id for other in await self.store.group_jobs(group)
                                   if other.status is Status.PROCESSING), None)
        return None if running[group] is None else f"waiting: {group} {running[group]} is running"

    async def _worker_wait(self, job: Job) -> str | None:
        if not job.runs_on or any(worker.takes(job.runs_on)
                                  for worker in await self._live_workers()):
            return None
        return f"waiting for a worker with {', '.join(job.runs_on)}"

    async def _live_workers(self) -> list[Worker]:
        """The live workers (read at most every WORKERS_CACHE_S: a list of many waiting
        jobs asks once)."""
        now = time.monotonic()
        if self._workers_cache is None or now - self._workers_cache[0] > WORKERS_CACHE_S:
            lease_s, wall = self.config.queue.lease_s, time.time()
            live = [worker for worker in await self.store.list_workers()
                    if worker.alive(wall, lease_s)]
            self._workers_cache = (now, live)
        return self._workers_cache[1]

    async def scrape_metrics(self) -> CollectorRegistry:
        """The metrics, with the gauges read now."""
        try:
            jobs = await self._read(self.store.count_jobs)
        except StoreUnavailableError:
            jobs = None  # a store in trouble is what the metrics must show, not hide
        self.metrics.set_gauges(
            jobs=jobs,
            # This process's job slots: each process of a fleet is scraped on its own.
            workers=self.config.queue.workers,
            subscribers=self.monitor.subscriber_count,
            store_up=self.health.up,
            store_errors={str(kind): count for kind, count in self.health.errors.items()},
        )
        return self.metrics.registry

    # -- the bot's own records: its progress messages and its login ----------------------------

    @property
    def store_shared(self) -> bool:
        """Whether other processes use the same store (a fleet, a hot standby)."""
        return self.store.shared

    async def unsent_messages(self) -> list[ProgressMessage]:
        """Where work a webhook or schedule started is to be shown, not sent yet."""
        return await self._read(self.store.unsent_messages)

    async def open_messages(self) -> list[ProgressMessage]:
        """The progress messages of work not yet shown finished (to go on after a restart)."""
        return await self._read(self.store.open_messages)

    async def save_message(self, message: ProgressMessage, now: float) -> None:
        await self._record(self.store.save_message, message, now)

    async def update_message(self, subject_id: str, edits: int, final: bool) -> None:
        await self._record(self.store.update_message, subject_id, edits, final)

    async def setting(self, key: str) -> str | None:
        return await self._read(self.store.get_setting, key)

    async def set_setting(self, key: str, value: str) -> None:
        await self._record(self.store.set_setting, key, value)

    async def _record(self, write: Callable[P, Awaitable[None]], *args: P.args,
                      **kwargs: P.kwargs) -> None:
        """A write of an interface's own records: like a read (`_reading`), it says a store
        in trouble at once (StoreUnavailableError) rather than wait out a pool that cannot
        reach it. Not refused up front like new work: a locked or full store may still
        take it."""
        async with self._reading():
            await write(*args, **kwargs)

    async def progress_message(self, subject: str) -> ProgressMessage | None:
        """Where a room shows this job's or batch's progress, once that message was sent."""
        message = await self._read(self.store.get_message, _canonical(subject))
        return message if message is not None and message.event_id is not None else None


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None  # the write probe tells what is wrong


def token_digest(token: str) -> str:
    """What the store keeps of a personal token: 256 random bits need no slow hash."""
    return hashlib.sha256(token.encode()).hexdigest()


def _entry(caller: Caller | None, action: AuditAction, target: str,
           detail: Mapping[str, object] | None = None, subject: str | None = None
           ) -> Entry | None:
    """The audit record of `caller`'s action (None for the core's own work)."""
    if caller is None:
        return None
    place = caller.place
    return Entry(action, caller.user, str(caller.via), subject=subject, target=target or None,
                 room_id=None if place is None else place.room_id, event_id=caller.event_id,
                 detail=detail or {})


def _cause(trigger: Trigger) -> dict[str, object]:
    """What the audit record keeps of a trigger: the delivery's ref and commit, the slot."""
    return {key: value for key, value in (("ref", trigger.ref), ("sha", trigger.sha),
                                          ("slot", trigger.slot)) if value is not None}


def _held(approval: Approval | None) -> bool:
    """Whether new work waits for approval."""
    return approval is not None and not approval.granted


def _requester(caller: Caller | None) -> str | None:
    return caller.requester if caller is not None else None


def _target(job: Job) -> str:
    """The configured target a job ran ("" for work that was not a target's)."""
    target = job.data.get("target")
    return target if isinstance(target, str) else ""


def _job_id(subject: str) -> str:
    parsed = parse_id(subject)
    if parsed is None or parsed[0] != JOB_PREFIX:
        raise NotFoundError(f"'{subject}' is not a job id (like j12)")
    return f"{parsed[0]}{parsed[1]}"


def _canonical(subject: str) -> str:
    parsed = parse_id(subject)
    if parsed is None:
        raise NotFoundError(f"'{echo(subject)}' is not a job or batch id (like j12 or b3)")
    return f"{parsed[0]}{parsed[1]}"

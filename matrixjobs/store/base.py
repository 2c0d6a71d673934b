"""The store interface the core depends on.

The queue, batches and monitor talk only to this class, so another backend
(PostgreSQL for workers on several machines) is one more module beside
`sqlite.py`. Every method is one transaction.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from matrixjobs.audit import AuditQuery, Entry, Record
from matrixjobs.models import (
    Approval,
    Batch,
    Job,
    JobSpec,
    Outcome,
    PersonalToken,
    Progress,
    ProgressMessage,
    ScheduleState,
    Status,
    Worker,
    job_id,
)


@dataclass(slots=True)
class Cycle:
    """What one settle-and-claim transaction did."""

    claimed: list[Job] = field(default_factory=list)
    batches: list[Batch] = field(default_factory=list)


@dataclass(slots=True)
class Recovery:
    """Jobs found `processing` whose worker is gone, and what became of them."""

    cancelled: list[Job] = field(default_factory=list)
    resumed: list[Job] = field(default_factory=list)  # back to pending, no retry spent
    requeued: list[Job] = field(default_factory=list)
    failed: list[Job] = field(default_factory=list)
    batches: list[Batch] = field(default_factory=list)

    @property
    def ended(self) -> list[Job]:
        """Every job it settled, whatever became of it."""
        return self.cancelled + self.resumed + self.requeued + self.failed


@dataclass(slots=True)
class Heartbeat:
    """What a heartbeat learnt about the jobs its worker runs."""

    lost: list[str] = field(default_factory=list)  # no longer ours: stop them, drop outcomes
    cancel: list[str] = field(default_factory=list)  # cancel asked for (maybe on another host)


def heartbeat_of(running: Sequence[str], held: Iterable[Sequence[Any]]) -> Heartbeat:
    """`held`: rows of (job number, cancel requested), one per job the owner still holds."""
    ours = {job_id(number): bool(cancel) for number, cancel in held}
    return Heartbeat(lost=[job for job in running if job not in ours],
                     cancel=sorted(job for job, cancel in ours.items() if cancel))


@dataclass(slots=True)
class BatchCancel:
    batch: Batch
    cancelled: list[Job]
    running: list[str]


class Store(abc.ABC):
    """Durable jobs and batches. Specs passed in have max_retries and timeout_s resolved."""

    # Whether other processes (workers on other hosts) share this store.
    shared: bool = False
    # Whether this process claims jobs of concurrency groups: only one whose config has a
    # target with a group does (where asking costs a round trip per claim, PostgreSQL).
    claims_groups: bool = True

    def listen(self, on_message: Callable[[str, list[str]], None],
               on_reconnect: Callable[[], None]) -> Callable[[], Awaitable[None]] | None:
        """What runs to hear other processes' news: `on_message(kind, ids)` with kind "new"
        (jobs to run), "cancel" (jobs to stop where they run) or "change" (jobs and batches
        to read again); `on_reconnect()` after news may have been missed. None when no
        other process shares the store."""
        return None

    @abc.abstractmethod
    async def open(self) -> None:
        """Create or migrate the schema; raise StoreError when that is impossible."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def add_jobs(
        self, specs: Sequence[JobSpec], now: float, dedupe_key: str | None = None,
        show: ProgressMessage | None = None, audit: Entry | None = None,
    ) -> list[Job]:
        """Add jobs. With `dedupe_key`, raise AlreadySubmittedError if that key was used
        before. `show` (its subject_id is ignored) records where a single job's progress
        is to be shown. Key, jobs, message and the `audit` record (about the first job)
        are written in one transaction.

        Work of a schedule's slot (its trigger names the slot) is refused with
        SlotHeldError if the schedule is paused or the slot was dealt with, as committed
        when the transaction reads it; else the slot is recorded as dealt with, with what
        it started, in the same transaction. So a pause committed first always wins."""

    @abc.abstractmethod
    async def add_batch(
        self, name: str, specs: Sequence[JobSpec], now: float, dedupe_key: str | None = None,
        show: ProgressMessage | None = None, approval: Approval | None = None,
        audit: Entry | None = None,
    ) -> tuple[Batch, list[Job]]:
        """Add a batch and its jobs; `dedupe_key`, `show` and `audit` as for add_jobs. With
        an `approval`, its jobs are held until it is granted."""

    @abc.abstractmethod
    async def settle_and_claim(
        self, outcomes: Sequence[Outcome], owner: str, limit: int, now: float, lease_s: float,
        labels: Sequence[str] = (), worker: str | None = None, ahead: int = 0,
        started: Sequence[str] = (),
    ) -> Cycle:
        """Record finished runs (with their logs), then claim up to `limit` due pending
        jobs for `owner` (whose worker is named `worker`): only jobs whose `runs_on` labels
        are all among `labels`. The last `ahead` claimed wait for a free slot: until a
        later call names them in `started`, recovery gives them back without spending a
        retry (they never ran).

        Outcomes apply only to jobs still `processing` for `owner`: a run whose lease
        another node took over changes nothing (fencing).
        """

    @abc.abstractmethod
    async def heartbeat(
        self, owner: str, progress: dict[str, Progress], now: float, lease_s: float,
        running: Sequence[str] = (),
    ) -> Heartbeat:
        """Extend the leases of the jobs in `running` (all the owner holds: running, ready,
        or settling) and the owner's worker row, and save their progress snapshots. Says
        which of `running` it no longer holds and which are to be cancelled. A job the
        owner holds in the store but does not name (a claim whose answer it never got)
        keeps its lease, which runs out: then any node takes it back."""

    @abc.abstractmethod
    async def save_progress(self, progress: dict[str, Progress], owner: str) -> None:
        """Save the progress of jobs `owner` runs, for other processes to show."""

    @abc.abstractmethod
    async def recover_interrupted(self, owner: str, now: float,
                                  stopped_owner: str | None = None,
                                  orphans: Sequence[str] = ()) -> Recovery:
        """At start: settle jobs whose worker died: cancel those whose cancel was requested,
        requeue (retry_count < max_retries) or fail ("interrupted") the rest. Jobs of
        `stopped_owner` (a service told to stop, then forced out) go back to pending
        without spending a retry: they were not the reason it died. A shared store takes
        only jobs whose lease ran out or whose owner is among `orphans` (processes known
        to be gone)."""

    @abc.abstractmethod
    async def recover_expired(self, now: float) -> Recovery:
        """Any time: settle, as recover_interrupted does, the running jobs whose lease ran
        out (their worker died or lost the store)."""

    @abc.abstractmethod
    async def request_cancel(self, job_id: str, audit: Entry | None = None) -> bool:
        """Record that a running job is to be cancelled, so a crash cannot undo it (False:
        it is not running). `audit` is recorded with it."""

    @abc.abstractmethod
    async def cancel_pending(self, job_id: str, now: float, audit: Entry | None = None
                             ) -> tuple[Job, Batch | None] | None:
        """Cancel a job if it is still pending (with the `audit` record); None when it is
        not."""

    @abc.abstractmethod
    async def cancel_batch(self, batch_id: str, now: float, audit: Entry | None = None
                           ) -> BatchCancel | None:
        """Mark a batch cancelled-on-request and cancel its pending jobs (with the `audit`
        record); None if unknown."""

    @abc.abstractmethod
    async def next_due(self) -> float | None:
        """The earliest `run_after` among pending jobs not held for approval."""

    @abc.abstractmethod
    async def set_approval(self, subject_id: str, before: Approval, after: Approval,
                           release_at: float | None, audit: Entry | None = None) -> bool:
        """Replace a pending job's or batch's approval `before` with `after` (False if it
        is no longer `before`: someone else changed it first); with `release_at`, in the
        same transaction its held jobs become due then, and `audit` is recorded."""

    @abc.abstractmethod
    async def append_audit(self, entry: Entry) -> Record:
        """Record an action that changes nothing else (a refusal, a start or stop)."""

    @abc.abstractmethod
    async def audit_records(self, query: AuditQuery) -> list[Record]:
        """The newest `query.limit` records that match, oldest first."""

    @abc.abstractmethod
    async def audit_chain(self) -> tuple[list[Record], tuple[int, str]]:
        """Every record in order, and the head (seq, hash) the store keeps, read together."""

    @abc.abstractmethod
    async def prune_audit(self, before: float) -> int:
        """Remove the records older than `before` from the start of the chain and record
        that it was done; how many went."""

    @abc.abstractmethod
    async def awaiting_approval(self) -> list[tuple[str, Approval]]:
        """(subject id, approval) of every job and batch whose jobs are held."""

    @abc.abstractmethod
    async def add_token(self, digest: str, token: PersonalToken, audit: Entry) -> None:
        """Keep a personal token's digest (TokenExistsError if its owner has one of that
        name), with the `audit` record."""

    @abc.abstractmethod
    async def list_tokens(self, user: str | None) -> list[PersonalToken]:
        """`user`'s tokens, or everyone's (None)."""

    @abc.abstractmethod
    async def revoke_token(self, user: str, name: str, audit: Entry) -> bool:
        """Forget `user`'s token `name` (False: no such token), with the `audit` record."""

    @abc.abstractmethod
    async def token_owner(self, digest: str) -> str | None:
        """Whose token has this digest, if anyone's."""

    @abc.abstractmethod
    async def schedule_states(self) -> list[ScheduleState]:
        """Every schedule's shared state, as far as any node recorded one."""

    @abc.abstractmethod
    async def schedule_done(self, name: str, slot: float, subject_id: str | None) -> None:
        """Record `slot` as dealt with: fired (`subject_id`: what it started, here or on
        another node), skipped, or passed before the schedule was first seen (None). An
        older slot never replaces a newer one."""

    @abc.abstractmethod
    async def rebase_schedule(self, name: str, slot: float, cron: str, timezone: str) -> None:
        """Record that the schedule's slots are read from `cron` in `timezone` (first seen,
        or changed since its last slot), and `slot` dealt with: it starts with the next.
        An older slot never replaces a newer one; a pause stays."""

    @abc.abstractmethod
    async def pause_schedule(self, name: str, paused_by: str | None, passed: float,
                             audit: Entry) -> bool:
        """Pause (`paused_by`: who) or resume (None) a schedule, with the `audit` record;
        slots up to `passed` count as dealt with (a resume does not run what the pause
        held back). False: it already was so, and nothing was written."""

    @abc.abstractmethod
    async def get_job(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    async def get_batch(self, batch_id: str) -> Batch | None: ...

    @abc.abstractmethod
    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        """The jobs of these ids that exist, in id order."""

    @abc.abstractmethod
    async def list_jobs(
        self,
        statuses: Sequence[Status] | None = None,
        batch_id: str | None = None,
        limit: int = 50,
    ) -> list[Job]:
        """Newest first."""

    @abc.abstractmethod
    async def count_jobs(self) -> dict[Status, int]:
        """How many jobs are in each state (states with none may be missing)."""

    @abc.abstractmethod
    async def list_batches(
        self, statuses: Sequence[Status] | None = None, limit: int = 50
    ) -> list[Batch]:
        """Newest first."""

    @abc.abstractmethod
    async def previous_outcome(self, subject_id: str) -> Status | None:
        """How the last run of the same work ended before `subject_id` finished: the status
        of the job (batch) with the same name that finished last before it, completed or
        failed (a cancelled run says nothing about the work). None when there is none."""

    @abc.abstractmethod
    async def save_message(self, message: ProgressMessage, now: float) -> None: ...

    @abc.abstractmethod
    async def key_subject(self, key: str) -> tuple[bool, str | None]:
        """Whether the dedupe key `key` was used, and the job or batch it started."""

    @abc.abstractmethod
    async def message_subject(self, room_id: str, event_id: str) -> str | None:
        """The job or batch whose progress message is `event_id` in `room_id`, if any."""

    @abc.abstractmethod
    async def update_message(self, subject_id: str, edits: int, final: bool) -> None: ...

    @abc.abstractmethod
    async def open_messages(self) -> list[ProgressMessage]:
        """Progress messages whose final state has not been shown yet, oldest first."""

    @abc.abstractmethod
    async def group_jobs(self, group: str) -> list[Job]:
        """The running and queued jobs of a concurrency group, running first, then oldest
        first."""

    @abc.abstractmethod
    async def active_groups(self) -> list[str]:
        """The concurrency groups with running or queued jobs."""

    @abc.abstractmethod
    async def unsent_messages(self) -> list[ProgressMessage]:
        """Progress messages of work no command asked for (a webhook's, a schedule's) that
        no bot has sent yet, oldest first."""

    @abc.abstractmethod
    async def get_message(self, subject_id: str) -> ProgressMessage | None:
        """The message that shows this job's or batch's progress, if any."""

    @abc.abstractmethod
    async def get_setting(self, key: str) -> str | None: ...

    @abc.abstractmethod
    async def set_setting(self, key: str, value: str) -> None: ...

    @abc.abstractmethod
    async def save_logs(self, logs: dict[str, str]) -> None:
        """Replace the logs of these jobs (id → whole text) while they are `processing`;
        a job's final log comes with its outcome (Outcome.log) instead."""

    @abc.abstractmethod
    async def get_log(self, job_id: str) -> str | None:
        """A job's saved log; None when it has none (yet)."""

    async def set_patience(self, patient: bool) -> None:
        """Whether a write waits out a store another process holds busy (True, as opened)
        or gives up at once. While the store is known to be unavailable the App makes it
        impatient: writes would fail anyway, and reads must not queue behind them. Only
        SQLite waits; the others have nothing to change."""
        return None

    @abc.abstractmethod
    async def purge_finished(self, before: float) -> int:
        """Delete jobs and batches that finished before `before`, with their logs; return
        how many rows. Worker rows silent since before `before` go too (not counted)."""

    @abc.abstractmethod
    async def register_worker(self, worker: Worker) -> None:
        """Write this process's row in the workers table (replacing one with its id)."""

    @abc.abstractmethod
    async def unregister_worker(self, worker_id: str) -> None:
        """Delete a worker's row: it stopped cleanly (unknown ids are no error)."""

    @abc.abstractmethod
    async def list_workers(self) -> list[Worker]:
        """Every worker row, silent ones too, by name then id; each with `running`, the ids
        of the jobs `processing` for it, in id order."""

    # -- exclusive roles: one process of those sharing the store does a job (the bot) ------

    async def try_lead(self, role: str, lease_s: float) -> bool:
        """Take `role` unless another process holds it; True while this one holds it. A
        holder that dies or loses the database frees it within `lease_s`. A store only one
        process can open (SQLite) always leads."""
        return True

    async def leading(self, role: str) -> bool:
        """Whether this process still holds `role`, confirmed now (False once it was lost)."""
        return True

    async def resign(self, role: str) -> None:
        """Give `role` up, or stop waiting for it."""
        return None  # nothing to give up where every process leads

    async def leader(self, role: str) -> str | None:
        """Who holds `role` (the process's connection name), when the store can tell."""
        return None

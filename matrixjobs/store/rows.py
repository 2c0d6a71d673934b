"""Rows as both backends write and read them: the column lists, and the mapping from a
row to a Job or Batch, so the SQLite and PostgreSQL stores cannot disagree about them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from matrixjobs.audit import COLUMNS as AUDIT_COLUMNS
from matrixjobs.models import (
    BATCH_PREFIX,
    HELD_UNTIL,
    Approval,
    Batch,
    Job,
    JobSpec,
    PersonalToken,
    Progress,
    ScheduleState,
    Status,
    Trigger,
    TriggerKind,
    Worker,
    batch_id,
    job_id,
    parse_id,
)

JOB_COLUMNS = (
    "id, type, name, data, status, priority, retry_count, max_retries, timeout_s, batch_id, "
    "run_after, created_at, started_at, finished_at, progress_current, progress_total, "
    "progress_message, error, result, requester, runs_on, worker, approval, trigger_info, "
    "concurrency"
)
# The same, named with their table: for statements that join jobs with another.
QUALIFIED_JOB_COLUMNS = ", ".join(f"jobs.{column.strip()}" for column in JOB_COLUMNS.split(","))
BATCH_COLUMNS = (
    "id, name, status, total, completed, failed, cancelled, cancel_requested, "
    "created_at, started_at, finished_at, requester, approval, trigger_info"
)
ERRORS_PER_BATCH = 20


def recount(batch: Batch, counts: dict[Status, int], now: float) -> None:
    """Settle `batch` from its jobs' counts by status: its tallies, its status, and when it
    started and finished (the first time it is seen doing so)."""
    batch.completed = counts[Status.COMPLETED]
    batch.failed = counts[Status.FAILED]
    batch.cancelled = counts[Status.CANCELLED]
    batch.status = batch_status(batch, counts)
    if batch.status != Status.PENDING and batch.started_at is None:
        batch.started_at = now
    if batch.status.terminal and batch.finished_at is None:
        batch.finished_at = now


def batch_status(batch: Batch, counts: dict[Status, int]) -> Status:
    if batch.finished < batch.total:
        started = counts[Status.PROCESSING] or batch.finished or batch.started_at
        return Status.PROCESSING if started else Status.PENDING
    if batch.cancel_requested:
        return Status.CANCELLED
    if batch.failed or batch.cancelled:
        return Status.FAILED
    return Status.COMPLETED


def number_of(identifier: str) -> int:
    return int(identifier[1:])


def checked_number(identifier: str, prefix: str) -> int | None:
    parsed = parse_id(identifier)
    return parsed[1] if parsed and parsed[0] == prefix else None


def dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str)


def first_line(text: str | None) -> str:
    lines = (text or "failed").strip().splitlines()
    return (lines[-1] if lines else "failed")[:200]


def held(spec: JobSpec, batch_approval: Approval | None) -> float:
    """The run_after a new job starts with: held while its own or its batch's approval is
    awaited, else due at once."""
    return HELD_UNTIL if (spec.approval or batch_approval) is not None else 0.0


def approval_text(approval: Approval | None) -> str | None:
    return None if approval is None else approval.to_json()


def trigger_text(trigger: Trigger | None) -> str | None:
    return None if trigger is None else trigger.to_json()


# The jobs and batches whose jobs are held for approval ({p}: the driver's placeholder).
AWAITING_APPROVAL = (
    "SELECT 'j' || id, approval FROM jobs WHERE status = 'pending' AND approval IS NOT NULL "
    "AND run_after >= {p} UNION ALL SELECT 'b' || id, approval FROM batches "
    "WHERE status = 'pending' AND approval IS NOT NULL AND id IN (SELECT batch_id FROM jobs "
    "WHERE status = 'pending' AND run_after >= {p})"
)


SCHEDULE_COLUMNS = "name, last_slot, last_job, paused_by, paused_at, cron, timezone"
# A schedule's slot dealt with ({p}: the driver's placeholder): an older slot (a node that
# was late) never replaces a newer one, and a skipped slot (no job) keeps the last job.
SCHEDULE_DONE = (
    "INSERT INTO schedules (name, last_slot, last_job) VALUES ({p}, {p}, {p}) "
    "ON CONFLICT (name) DO UPDATE SET last_slot = excluded.last_slot, "
    "last_job = coalesce(excluded.last_job, schedules.last_job) "
    "WHERE schedules.last_slot IS NULL OR schedules.last_slot <= excluded.last_slot"
)
# A schedule's slots read from a cron and zone (a schedule first seen, or whose cron or zone
# changed), with slots up to the given one dealt with.
SCHEDULE_REBASE = (
    "INSERT INTO schedules (name, last_slot, cron, timezone) VALUES ({p}, {p}, {p}, {p}) "
    "ON CONFLICT (name) DO UPDATE SET cron = excluded.cron, timezone = excluded.timezone, "
    "last_slot = CASE WHEN schedules.last_slot > excluded.last_slot THEN schedules.last_slot "
    "ELSE excluded.last_slot END"
)
# The later of a stored slot and {p}.
LATER_SLOT = "CASE WHEN last_slot > {p} THEN last_slot ELSE {p} END"
SCHEDULE_PAUSE = (
    "INSERT INTO schedules (name, last_slot, paused_by, paused_at) VALUES ({p}, {p}, {p}, {p}) "
    "ON CONFLICT (name) DO UPDATE SET paused_by = excluded.paused_by, "
    "paused_at = excluded.paused_at, last_slot = CASE WHEN schedules.last_slot > "
    "excluded.last_slot THEN schedules.last_slot ELSE excluded.last_slot END "
    "WHERE schedules.paused_by IS NULL"
)
SCHEDULE_RESUME = (
    "UPDATE schedules SET paused_by = NULL, paused_at = NULL, last_slot = " + LATER_SLOT +
    " WHERE name = {p} AND paused_by IS NOT NULL"
)


# A slot's schedule, read in the transaction that starts the slot's work (PostgreSQL adds
# FOR UPDATE: a pause under way is waited for, then seen).
SCHEDULE_OF_SLOT = f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE name = {{p}}"


def schedule_slot(specs: Sequence[JobSpec]) -> Trigger | None:
    """The schedule's slot this work is for, if a schedule's slot starts it."""
    trigger = specs[0].trigger if specs else None
    if trigger is None or trigger.kind is not TriggerKind.SCHEDULE or trigger.slot is None:
        return None
    return trigger


def slot_held(slot: Trigger, state: ScheduleState | None) -> str | None:
    """Why `slot` may start nothing now (None: it may): its schedule is paused, or the
    slot was dealt with (passed while paused, skipped)."""
    if state is None:
        return None
    if state.paused:
        return f"schedule {slot.name} is paused by {state.paused_by}"
    if state.last_slot is not None and slot.slot is not None and slot.slot <= state.last_slot:
        return f"schedule {slot.name}'s slot was dealt with meanwhile"
    return None


def schedule_from_row(row: Sequence[Any]) -> ScheduleState:
    name, last_slot, last_job, paused_by, paused_at, cron, timezone = row
    return ScheduleState(name, None if last_slot is None else float(last_slot), last_job,
                         paused_by, None if paused_at is None else float(paused_at),
                         cron, timezone)


def approvals_of(rows: Sequence[Sequence[Any]]) -> list[tuple[str, Approval]]:
    """AWAITING_APPROVAL's rows as (subject id, approval)."""
    return [(subject, approval) for subject, text in rows
            if (approval := Approval.from_json(text)) is not None]


def token_exists(token: PersonalToken) -> str:
    return f"{token.user} already has a token named {token.name}: revoke it or pick another name"


def approval_table(subject_id: str) -> tuple[str, str]:
    """The table a job's or batch's approval is in, and the jobs column it holds them by."""
    return ("batches", "batch_id") if subject_id.startswith(BATCH_PREFIX) else ("jobs", "id")


def job_from_row(row: Sequence[Any]) -> Job:
    (number, type_, name, data, status, priority, retry_count, max_retries, timeout_s,
     batch_number, run_after, created_at, started_at, finished_at, p_current, p_total,
     p_message, error, result, requester, runs_on, worker, approval, trigger, concurrency) = row
    progress = None
    if p_current is not None:
        progress = Progress(p_current, p_total, p_message)
    return Job(
        id=job_id(number), type=type_, name=name, data=json.loads(data), status=Status(status),
        priority=priority, retry_count=retry_count, max_retries=max_retries,
        timeout_s=timeout_s, created_at=created_at,
        batch_id=None if batch_number is None else batch_id(batch_number),
        run_after=run_after, started_at=started_at, finished_at=finished_at,
        progress=progress, error=error, result=None if result is None else json.loads(result),
        requester=requester, runs_on=json.loads(runs_on), worker=worker,
        approval=Approval.from_json(approval), trigger=Trigger.from_json(trigger),
        concurrency=concurrency,
    )


def batch_from_row(row: Sequence[Any]) -> Batch:
    (number, name, status, total, completed, failed, cancelled, cancel_requested,
     created_at, started_at, finished_at, requester, approval, trigger) = row
    return Batch(
        id=batch_id(number), name=name, status=Status(status), total=total,
        completed=completed, failed=failed, cancelled=cancelled,
        cancel_requested=bool(cancel_requested), created_at=created_at,
        started_at=started_at, finished_at=finished_at, requester=requester,
        approval=Approval.from_json(approval), trigger=Trigger.from_json(trigger),
    )


MESSAGE_TABLE_COLUMNS = (
    "subject_id, room_id, event_id, requester, reply_to, edits, final, created_at"
)

WORKER_COLUMNS = "id, name, host, pid, role, labels, slots, version, started_at, heartbeat_at"


def worker_from_row(row: Sequence[Any]) -> Worker:
    (id_, name, host, pid, role, labels, slots, version, started_at, heartbeat_at) = row
    return Worker(id=id_, name=name, host=host, pid=pid, role=role, labels=json.loads(labels),
                  slots=slots, version=version, started_at=started_at,
                  heartbeat_at=heartbeat_at)


def worker_values(worker: Worker) -> tuple[Any, ...]:
    """The row of WORKER_COLUMNS for `worker`."""
    return (worker.id, worker.name, worker.host, worker.pid, worker.role,
            json.dumps(sorted(worker.labels)), worker.slots, worker.version, worker.started_at,
            worker.heartbeat_at)


# The jobs each worker row holds now, as (owner, job number) rows in id order.
RUNNING_BY_OWNER = (
    "SELECT owner, id FROM jobs WHERE status = 'processing' AND owner IN (SELECT id FROM workers) "
    "ORDER BY id"
)


def with_running(workers: list[Worker], running: Sequence[Sequence[Any]]) -> list[Worker]:
    """Fill each worker's `running` from RUNNING_BY_OWNER's rows."""
    by_id = {worker.id: worker for worker in workers}
    for owner, number in running:
        by_id[owner].running.append(job_id(number))
    return workers


# Every table a store holds, parents before children (foreign keys), with every column:
# what `migrate-store` copies. jobs adds what JOB_COLUMNS leaves out (cancel and lease).
TABLES: tuple[tuple[str, str], ...] = (
    ("batches", BATCH_COLUMNS),
    ("jobs", f"{JOB_COLUMNS}, cancel_requested, owner, lease_expires_at, claimed_ahead"),
    ("job_logs", "job_id, text"),
    ("progress_messages", MESSAGE_TABLE_COLUMNS),
    ("processed_events", "event_id, subject_id, processed_at"),
    ("settings", "key, value"),
    ("audit", AUDIT_COLUMNS),
    ("tokens", "digest, user_id, name, created_at"),
    ("schedules", SCHEDULE_COLUMNS),
)
# Tables whose ids the stores hand out, as j12 and b3 that room messages name.
NUMBERED_TABLES = ("batches", "jobs")

"""The unified `job-progress` event, as every interface sees it (JSON in camelCase)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from matrixjobs.logs import redact
from matrixjobs.models import Approval, Batch, Job, Status, Trigger, TriggerKind

MESSAGE_LIMIT = 500


class CamelModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)


class ProgressInfo(CamelModel):
    current: float
    total: float | None = None
    percentage: float | None = None


class BatchDetails(CamelModel):
    total_operations: int
    completed_operations: int
    failed_operations: int
    cancelled_operations: int = 0
    current_operation: str | None = None
    errors: list[str] = []


class JobDetails(CamelModel):
    job_type: str
    priority: int
    retry_count: int
    max_retries: int
    batch_id: str | None = None
    runs_on: list[str] | None = None  # labels its worker must have; None: any worker


class ApprovalInfo(CamelModel):
    """What held work waits for: `required` approvals by `expiresAt`; who approved so far;
    who denied it (and why), or that it expired."""

    required: int
    approved_by: list[str] = []
    denied_by: str | None = None
    reason: str | None = None
    expired: bool = False
    expires_at: datetime


def approval_info(approval: Approval | None) -> ApprovalInfo | None:
    if approval is None:
        return None
    return ApprovalInfo(required=approval.required, approved_by=list(approval.approved_by),
                        denied_by=approval.denied_by, reason=approval.reason,
                        expired=approval.expired, expires_at=timestamp(approval.expires_at))


class TriggerInfo(CamelModel):
    """What started work that no person asked for: a webhook (its name and what the forge
    said happened) or a schedule (its name and slot)."""

    webhook: str | None = None
    event: str | None = None
    ref: str | None = None
    branch: str | None = None
    tag: str | None = None
    sha: str | None = None
    pusher: str | None = None
    repo: str | None = None
    schedule: str | None = None
    slot: datetime | None = None
    timezone: str | None = None  # the schedule's: its slot reads in this zone


def trigger_info(trigger: Trigger | None) -> TriggerInfo | None:
    if trigger is None:
        return None
    named = {"webhook" if trigger.kind is TriggerKind.WEBHOOK else "schedule": trigger.name}
    return TriggerInfo(**named, event=trigger.event, ref=trigger.ref, branch=trigger.branch,
                       tag=trigger.tag, sha=trigger.sha, pusher=trigger.pusher,
                       repo=trigger.repo, slot=timestamp(trigger.slot),
                       timezone=trigger.timezone)


class JobProgressEvent(CamelModel):
    id: str
    type: Literal["job", "batch"]
    name: str
    status: Status
    message: str | None = None
    progress: ProgressInfo | None = None
    batch_details: BatchDetails | None = None
    job_details: JobDetails | None = None
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    updated_at: datetime
    finished_at: datetime | None = None
    eta_seconds: float | None = None
    requester: str | None = None
    worker: str | None = None  # the worker (its [worker] name) that runs or last ran a job
    approval: ApprovalInfo | None = None  # set while, and after, work waits for approval
    trigger: TriggerInfo | None = None  # set when a webhook or schedule started it
    # A matrix.to link to the room message showing this progress; set by the API on
    # single-item answers only (a store read each), never by the monitor.
    message_url: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status.terminal


def timestamp(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def clean_progress(
    current: object, total: object, message: object = None
) -> tuple[ProgressInfo, str | None] | None:
    """Turn whatever a handler reported into sane numbers, or None if it is garbage.

    total = 0 (or missing) means "amount unknown": no percentage, no ETA.
    """
    cur = _number(current)
    if cur is None:
        return None
    cur = max(cur, 0.0)
    tot = _number(total)
    if tot is not None and tot <= 0:
        tot = None
    percentage = None if tot is None else round(min(cur / tot, 1.0) * 100, 1)
    # Masked before it is cut, so a cut cannot leave half a secret showing.
    text = None if message is None else redact(str(message)[:MESSAGE_LIMIT * 2])[:MESSAGE_LIMIT]
    return ProgressInfo(current=cur, total=tot, percentage=percentage), text


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def job_event(
    job: Job,
    now: float,
    progress: ProgressInfo | None = None,
    message: str | None = None,
    eta_seconds: float | None = None,
) -> JobProgressEvent:
    if progress is None and job.progress is not None:
        cleaned = clean_progress(job.progress.current, job.progress.total, job.progress.message)
        if cleaned is not None:
            progress, stored_message = cleaned
            message = message or stored_message
    return JobProgressEvent(
        id=job.id,
        type="job",
        name=job.name,
        status=job.status,
        message=message,
        progress=progress,
        job_details=JobDetails(
            job_type=job.type, priority=job.priority, retry_count=job.retry_count,
            max_retries=job.max_retries, batch_id=job.batch_id, runs_on=job.runs_on or None,
        ),
        error=job.error if job.status in (Status.FAILED, Status.PENDING) else None,
        created_at=timestamp(job.created_at),
        started_at=timestamp(job.started_at),
        updated_at=timestamp(now),
        finished_at=timestamp(job.finished_at),
        eta_seconds=None if job.status.terminal else eta_seconds,
        requester=job.requester,
        worker=job.worker,
        approval=approval_info(job.approval),
        trigger=trigger_info(job.trigger),
    )


def batch_event(
    batch: Batch,
    now: float,
    current_operation: str | None = None,
    message: str | None = None,
    eta_seconds: float | None = None,
    running_work: float = 0.0,
) -> JobProgressEvent:
    """`running_work`: how much of its running operations is done, in operations (two
    halfway operations are 1.0), so the percentage moves before an operation finishes."""
    finished = batch.finished
    done = finished + (0.0 if batch.status.terminal else running_work)
    return JobProgressEvent(
        id=batch.id,
        type="batch",
        name=batch.name,
        status=batch.status,
        message=message,
        progress=ProgressInfo(
            current=finished, total=batch.total,
            percentage=round(done / batch.total * 100, 1) if batch.total else None,
        ),
        batch_details=BatchDetails(
            total_operations=batch.total, completed_operations=batch.completed,
            failed_operations=batch.failed, cancelled_operations=batch.cancelled,
            current_operation=None if batch.status.terminal else current_operation,
            errors=list(batch.errors),
        ),
        created_at=timestamp(batch.created_at),
        started_at=timestamp(batch.started_at),
        updated_at=timestamp(now),
        finished_at=timestamp(batch.finished_at),
        eta_seconds=None if batch.status.terminal else eta_seconds,
        requester=batch.requester,
        approval=approval_info(batch.approval),
        trigger=trigger_info(batch.trigger),
    )


def event_of(item: Job | Batch, now: float) -> JobProgressEvent:
    """The event for a job or batch as stored (no live progress)."""
    return batch_event(item, now) if isinstance(item, Batch) else job_event(item, now)

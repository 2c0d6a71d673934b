"""Plain data the core passes around: job and batch records, specs and outcomes."""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any


class Status(enum.StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})

# The error a job carries when a stopping service sent it back to pending.
INTERRUPTED_BY_STOP = "the service stopped mid-run; it runs again when the service is back"

JOB_PREFIX = "j"
BATCH_PREFIX = "b"
MAX_ID = 2**63 - 1  # SQLite's largest integer: a larger number is no id we issued


def job_id(number: int) -> str:
    return f"{JOB_PREFIX}{number}"


def batch_id(number: int) -> str:
    return f"{BATCH_PREFIX}{number}"


def parse_id(text: str) -> tuple[str, int] | None:
    """Split 'j42' / 'b7' into ('j', 42); None when it is not an id we issue."""
    text = text.strip().lower()
    digits = text[1:]
    # ASCII only: isdigit() alone takes '١٢' (Arabic-Indic) for 12.
    if text[:1] not in (JOB_PREFIX, BATCH_PREFIX) or not (digits.isascii() and digits.isdigit()):
        return None
    # Length first: int() refuses (ValueError) more than 4300 digits.
    if len(digits) > len(str(MAX_ID)):
        return None
    number = int(digits)
    return (text[0], number) if number <= MAX_ID else None


@dataclass(slots=True)
class JobSpec:
    """What to run: enqueued as one job (or one operation of a batch)."""

    type: str
    data: dict[str, Any]
    name: str
    priority: int = 0
    max_retries: int | None = None
    timeout_s: float | None = None
    requester: str | None = None  # who asked: a Matrix user id, "api", "cli", "mcp"…
    runs_on: list[str] = field(default_factory=list)  # labels its worker must all have
    approval: Approval | None = None  # held until approved
    trigger: Trigger | None = None  # what started it, when no person asked
    concurrency: str | None = None  # its concurrency group: one of a group runs at a time


# The run_after of a job held for approval: no claim and no due time reaches it.
HELD_UNTIL = 1e18


@dataclass(frozen=True, slots=True)
class Approval:
    """What a job (or batch) waits for before it may run: `required` people other than its
    requester approving it before `expires_at`; one denial refuses it."""

    required: int
    expires_at: float
    approved_by: tuple[str, ...] = ()
    denied_by: str | None = None
    reason: str | None = None  # the denial's
    expired: bool = False

    @property
    def granted(self) -> bool:
        return len(self.approved_by) >= self.required

    @property
    def waiting(self) -> bool:
        return not (self.granted or self.denied_by or self.expired)

    def approved(self, user: str) -> Approval:
        return replace(self, approved_by=(*self.approved_by, user))

    def denied(self, user: str, reason: str | None) -> Approval:
        return replace(self, denied_by=user, reason=reason)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> Approval | None:
        if text is None:
            return None
        fields = json.loads(text)
        return cls(**{**fields, "approved_by": tuple(fields.get("approved_by", ()))})


def batch_approval(specs: Sequence[JobSpec]) -> Approval | None:
    """A batch waits for the approvals its operations would: the most any needs, by the
    earliest time any would expire."""
    approvals = [spec.approval for spec in specs if spec.approval is not None]
    if not approvals:
        return None
    return Approval(max(a.required for a in approvals), min(a.expires_at for a in approvals))


class TriggerKind(enum.StrEnum):
    WEBHOOK = "webhook"
    SCHEDULE = "schedule"


@dataclass(frozen=True, slots=True)
class Trigger:
    """What started work that no person asked for: a forge webhook's delivery or a
    schedule's slot."""

    kind: TriggerKind
    name: str  # the [webhooks.NAME] / [schedules.NAME] key
    event: str | None = None  # webhook: the forge's event name, as the forge sends it
    ref: str | None = None  # "refs/heads/main"
    branch: str | None = None
    tag: str | None = None
    sha: str | None = None  # the commit after the push
    pusher: str | None = None  # the forge's user name of who pushed
    repo: str | None = None  # "owner/name"
    slot: float | None = None  # schedule: the slot's time (epoch seconds)
    timezone: str | None = None  # schedule: the zone its cron reads (an IANA name)

    @property
    def requester(self) -> str:
        """What its work records as who asked: "webhook:site", "schedule:nightly"."""
        return f"{self.kind}:{self.name}"

    def to_json(self) -> str:
        return json.dumps({key: value for key, value in asdict(self).items()
                           if value is not None}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> Trigger | None:
        if text is None:
            return None
        fields = json.loads(text)
        return cls(**{**fields, "kind": TriggerKind(fields["kind"])})


@dataclass(frozen=True, slots=True)
class PersonalToken:
    """A personal API token as the store keeps it: never the token, only who and when."""

    user: str
    name: str
    created_at: float


@dataclass(frozen=True, slots=True)
class ScheduleState:
    """What every node sharing the store knows of a schedule (its config is each node's)."""

    name: str
    # The latest slot dealt with: fired, skipped, passed while paused, or the one before
    # the schedule was first seen (a new schedule does not run a slot from before it).
    last_slot: float | None = None
    last_job: str | None = None  # the job or batch its latest fired slot started
    paused_by: str | None = None
    paused_at: float | None = None
    # What last_slot was read from: the cron expression and its time zone (None: recorded
    # by a matrixjobs that did not keep them).
    cron: str | None = None
    timezone: str | None = None

    @property
    def paused(self) -> bool:
        return self.paused_by is not None


@dataclass(slots=True)
class Progress:
    current: float
    total: float | None
    message: str | None = None


@dataclass(slots=True)
class Job:
    id: str
    type: str
    name: str
    data: dict[str, Any]
    status: Status
    priority: int
    retry_count: int
    max_retries: int
    timeout_s: float
    created_at: float
    batch_id: str | None = None
    run_after: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress | None = None
    error: str | None = None
    result: Any = None
    requester: str | None = None
    runs_on: list[str] = field(default_factory=list)
    worker: str | None = None  # the name of the worker that runs it, or last ran it
    approval: Approval | None = None  # a batch's jobs are held by the batch's
    trigger: Trigger | None = None
    concurrency: str | None = None


@dataclass(slots=True)
class Batch:
    id: str
    name: str
    status: Status
    total: int
    created_at: float
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    cancel_requested: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    errors: list[str] = field(default_factory=list)
    requester: str | None = None
    approval: Approval | None = None
    trigger: Trigger | None = None

    @property
    def finished(self) -> int:
        return self.completed + self.failed + self.cancelled


@dataclass(slots=True)
class Outcome:
    """How one run of a job ended, as the queue hands it to the store.

    `retry_at` set means: back to pending, to run again at that time.
    """

    job_id: str
    status: Status
    finished_at: float
    error: str | None = None
    result: Any = None
    progress: Progress | None = None
    retry_at: float | None = None
    # False when the run was stopped by a shutdown, which is no fault of the job's.
    count_retry: bool = True
    # The job's whole log once this run ended; None: nothing new to save.
    log: str | None = None


@dataclass(slots=True)
class ProgressMessage:
    """Where an interface shows a job or batch: edits always target `event_id`
    (None until the first message has been sent)."""

    subject_id: str
    room_id: str
    event_id: str | None
    requester: str
    reply_to: str
    edits: int = 0
    final: bool = False


@dataclass(slots=True)
class Worker:
    """A process that runs jobs from a shared store: its row in the workers table."""

    id: str  # the queue's owner id (host:pid:random), unique per process start
    name: str  # [worker] name
    host: str
    pid: int
    role: str  # "run" (the service) or "worker" (`matrixjobs worker`)
    labels: list[str]
    slots: int  # how many jobs it runs at once ([queue] workers)
    version: str
    started_at: float
    heartbeat_at: float
    running: list[str] = field(default_factory=list)  # ids of the jobs it holds now

    def alive(self, now: float, lease_s: float) -> bool:
        """Whether it has beaten recently enough that its jobs' leases still hold."""
        return now - self.heartbeat_at < lease_s

    def takes(self, runs_on: Sequence[str]) -> bool:
        """Whether it may run a job whose target needs these labels (it has them all)."""
        return set(runs_on) <= set(self.labels)

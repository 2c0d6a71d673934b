"""How progress is worded, once, for every view: the room, the CLI, MCP and the dashboard.

Pure functions of numbers and events; the clock comes in as `now` (epoch seconds).

* Percentages round down (99.9 % is "99%"), so only finished work shows 100 %.
* A completed job whose total was never known shows 100 %.
* Durations are compact and cut, not rounded: "4s", "1m 05s", "2h 03m", "3d 4h".
* Counts drop a needless ".0": "3/10", "2.5/10"; an unknown total reads "34 done";
  a batch counts its finished operations: "2/3 operations".
* A worker: "2/4 running", its last heartbeat "3s ago", and "alive" or "silent for 2m 05s".
* Attempts are said only when there could be more than one: "passed on attempt 2 of 3"
  (a first-try success says nothing), "failed on attempt 3 of 3".
* Approvals: "awaiting approval 1/2", "approved by @bob", "denied by @bob: not today",
  "approval expired".
* What started work no person asked for: "🪝 push to main by alice (3f2c1ab)", "🪝 tag
  v1.2 by alice (3f2c1ab)", "⏰ nightly: the 03:00 Europe/Berlin run" (in the schedule's
  time zone).
* A schedule: "⏰ nightly (30 2 * * *, Europe/Berlin) → docs: next 2026-03-29 03:00 CEST;
  last j12 completed", "⏸️ nightly (…) → docs: paused by @bob; last j12 failed".
* A webhook's answer to a delivery it acts on no further: "ignored: event issues is not in
  events (push)", "ignored: branch feature/x matches none of main, release/*", "ignored:
  tag v1.2: this webhook takes branches only", "ignored: the push deleted branch old".
* A store in trouble is one line, the same in the room, the CLI and the dashboard:
  "Degraded — store: locked. New jobs are refused until the store recovers; running jobs
  go on."
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from zoneinfo import ZoneInfo

from matrixjobs.cron import Cron
from matrixjobs.fleet import WorkerState
from matrixjobs.models import Approval, Status
from matrixjobs.progress.events import ApprovalInfo, JobProgressEvent, TriggerInfo
from matrixjobs.schedules import ScheduleInfo

STATUS_WORD: dict[Status, str] = {
    Status.PENDING: "queued",
    Status.PROCESSING: "running",
    Status.COMPLETED: "completed",
    Status.FAILED: "failed",
    Status.CANCELLED: "cancelled",
}


def number(value: float) -> str:
    """3.0 → '3', 2.5 → '2.5', 1/3 → '0.33'; not a number → '?'."""
    if not math.isfinite(value):
        return "?"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def percent(percentage: float) -> str:
    """'34%', rounded down (99.9 → '99%'); out of range is clamped to 0 to 100."""
    if not math.isfinite(percentage):
        return "0%"
    return "100%" if percentage >= 100 else f"{math.floor(max(percentage, 0.0))}%"


def duration(seconds: float) -> str:
    """Compact: '4s', '1m 05s', '2h 03m', '3d 4h'; negative (or not a number) → '0s'."""
    if not math.isfinite(seconds) or seconds < 0:
        return "0s"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def shown_percentage(event: JobProgressEvent) -> float | None:
    """The percentage to show: the reported one, 100 for completed work of unknown total,
    None while unknown."""
    percentage = event.progress.percentage if event.progress else None
    if percentage is None and event.status is Status.COMPLETED:
        return 100.0
    return percentage


def shown_percent(event: JobProgressEvent) -> str:
    """`percent` of `shown_percentage`, or '' while unknown."""
    percentage = shown_percentage(event)
    return "" if percentage is None else percent(percentage)


def counts(event: JobProgressEvent) -> str:
    """'9/20', '34 done' (unknown total), '2/3 operations' (a batch); '' without progress."""
    progress = event.progress
    if progress is None:
        return ""
    if progress.total is None:
        return f"{number(progress.current)} done"
    unit = " operations" if event.type == "batch" else ""
    return f"{number(progress.current)}/{number(progress.total)}{unit}"


def eta(event: JobProgressEvent) -> str:
    """'ETA 1m 05s' while an estimate exists and the work is not over, else ''."""
    if event.eta_seconds is None or event.terminal:
        return ""
    return f"ETA {duration(event.eta_seconds)}"


def attempt(event: JobProgressEvent) -> str:
    """'attempt 2/3' for a job (its first run is attempt 1), '' for a batch."""
    details = event.job_details
    if details is None:
        return ""
    return f"attempt {details.retry_count + 1}/{details.max_retries + 1}"


def run_seconds(event: JobProgressEvent, now: float) -> float:
    """Run time (start → finish or now); time in the queue when it never started."""
    start = event.started_at or event.created_at
    end = event.finished_at.timestamp() if event.finished_at else now
    return end - start.timestamp()


def age(moment: datetime, now: float) -> str:
    """'4m 10s ago'."""
    return f"{duration(now - moment.timestamp())} ago"


def timing(event: JobProgressEvent, now: float) -> str:
    """'queued for 3s', 'never started (queued 1m 05s)', '12s elapsed · ETA 30s',
    'took 1m 05s'."""
    spent = duration(run_seconds(event, now))
    if event.started_at is None:
        text = f"never started (queued {spent})" if event.terminal else f"queued for {spent}"
    else:
        text = f"took {spent}" if event.terminal else f"{spent} elapsed"
    estimate = eta(event)
    return f"{text} · {estimate}" if estimate else text


def attempts(event: JobProgressEvent) -> str:
    """How many tries a finished job took, when that tells something: 'passed on attempt
    2 of 3', 'failed on attempt 3 of 3', 'failed on attempt 1 of 3, not retried' (a failure
    no retry can fix); '' for a first-try success, a job without retries, or a batch."""
    details = event.job_details
    if details is None or not event.terminal or details.max_retries == 0:
        return ""
    attempt, of = details.retry_count + 1, details.max_retries + 1
    if event.status is Status.COMPLETED and attempt > 1:
        return f"passed on attempt {attempt} of {of}"
    if event.status is Status.FAILED:
        left = ", not retried" if attempt < of else ""
        return f"failed on attempt {attempt} of {of}{left}"
    return ""


def load(worker: WorkerState) -> str:
    """'2/4 running': the jobs it holds of the ones it may run at once."""
    return f"{len(worker.running)}/{worker.slots} running"


def liveness(worker: WorkerState) -> str:
    """'alive', or 'silent for 2m 05s' once its heartbeat is older than the lease."""
    if worker.silent_for is None:
        return "alive"
    return f"silent for {duration(worker.silent_for)}"


def degraded(reason: str) -> str:
    """The one line every view shows while the store cannot take writes; `reason` as
    /healthz gives it ("store: disk full (42 MiB free, below [store] min_free_mb = 100)")."""
    return (f"Degraded — {reason}. New jobs are refused until the store recovers; "
            "running jobs go on.")


def approval_state(approval: Approval | ApprovalInfo) -> str:
    """Where an approval stands: 'awaiting approval 1/2', 'approved by @bob, @carol',
    'denied by @bob: not today' (or without a reason), 'approval expired'."""
    if approval.denied_by:
        reason = f": {approval.reason}" if approval.reason else ""
        return f"denied by {approval.denied_by}{reason}"
    if approval.expired:
        return "approval expired"
    if len(approval.approved_by) >= approval.required:
        return f"approved by {', '.join(approval.approved_by)}"
    return f"awaiting approval {len(approval.approved_by)}/{approval.required}"


def awaiting_approval(event: JobProgressEvent) -> bool:
    """Held until enough people approve it (and nobody denied it, and it did not expire)."""
    approval = event.approval
    return (approval is not None and event.status is Status.PENDING
            and not approval.denied_by and not approval.expired
            and len(approval.approved_by) < approval.required)


def started_by(trigger: TriggerInfo) -> str:
    """The line that says which webhook delivery or schedule slot started work."""
    if trigger.schedule is not None:
        if trigger.slot is None:
            return f"⏰ {trigger.schedule}"
        zone = trigger.timezone or "UTC"
        local = trigger.slot.astimezone(ZoneInfo(zone))
        return f"⏰ {trigger.schedule}: the {local:%H:%M} {zone} run"
    what = _cut(trigger.event or "delivery")
    if trigger.tag is not None:
        what = f"tag {_cut(trigger.tag)}"
    elif trigger.branch is not None:
        what = f"{what} to {_cut(trigger.branch)}"
    by = f" by {_cut(trigger.pusher)}" if trigger.pusher else ""
    commit = f" ({trigger.sha[:7]})" if trigger.sha else ""
    return f"🪝 {what}{by}{commit}"


def schedule(info: ScheduleInfo) -> str:
    """One schedule in a line: what starts when, then its next run or who paused it, and
    how its last run went."""
    mark = "⏸️" if info.paused else "⏰"
    return (f"{mark} {info.name} ({info.cron}, {info.timezone}) → {' '.join(info.targets)}"
            f"{''.join(f' {arg}' for arg in info.args)}: {schedule_when(info)}; "
            f"{schedule_last(info)}")


def schedule_when(info: ScheduleInfo) -> str:
    """'next 2026-03-29 03:00 CEST' (its wall clock; to the second when its cron has a
    seconds field, :00 too, so its runs line up), or 'paused by @bob'."""
    if info.paused:
        return f"paused by {info.paused_by}"
    if info.next_run is None:
        return "no next run"
    seconds = Cron.parse(info.cron, info.timezone).to_the_second
    return f"next {wall_clock(info.next_run, info.timezone, seconds=seconds)}"


def schedule_last(info: ScheduleInfo) -> str:
    """'last j12 completed', 'last b3 (no longer kept)', 'no run yet'."""
    if info.last_job is None:
        return "no run yet"
    if info.last_status is None:
        return f"last {info.last_job} (no longer kept)"
    return f"last {info.last_job} {STATUS_WORD[info.last_status]}"


def wall_clock(moment: datetime, zone: str, *, seconds: bool = False) -> str:
    """'2026-03-29 03:00 CEST' as `zone`'s clocks show it ('03:00:10' with `seconds`)."""
    local = moment.astimezone(ZoneInfo(zone))
    shown = local.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")
    return f"{shown} {local.tzname()}"


def _cut(text: str, limit: int = 60) -> str:
    """A forge's names are the sender's to choose: long ones are cut."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


# -- a webhook's answers ----------------------------------------------------------------------
# What the sender named (an event, a ref, a branch or tag) is quoted, so an empty or spaced
# one still reads ("ref '' is neither…", "event 'Note Hook'…"); the config's lists are not.


def _sent(text: str) -> str:
    return f"'{_cut(text)}'"


def hook_ignored_event(event: str, takes: Sequence[str]) -> str:
    return f"ignored: event {_sent(event)} is not in events ({', '.join(takes)})"


def hook_ignored_ref(kind: str, name: str, patterns: Sequence[str]) -> str:
    """`kind` ("branch" or "tag") `name` matching none of `patterns`; with no patterns the
    webhook takes only the other kind."""
    if not patterns:
        only = "tags" if kind == "branch" else "branches"
        return f"ignored: {kind} {_sent(name)}: this webhook takes {only} only"
    return f"ignored: {kind} {_sent(name)} matches none of {', '.join(patterns)}"


def hook_ignored_deletion(kind: str, name: str) -> str:
    return f"ignored: the push deleted {kind} {_sent(name)}"


def hook_ignored_other_ref(ref: str) -> str:
    return f"ignored: ref {_sent(ref)} is neither a branch nor a tag"


def hook_pong(name: str, starts: Sequence[str], takes: Sequence[str]) -> str:
    return f"pong: webhook {name} is ready; on {', '.join(takes)} it starts {' '.join(starts)}"

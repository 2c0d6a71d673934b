"""Rendering job-progress events: a live rich display, plain lines, or NDJSON."""

from __future__ import annotations

import enum
import sys
from collections.abc import Iterable
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table

from matrixjobs.fleet import WorkerState
from matrixjobs.models import Status
from matrixjobs.progress import wording
from matrixjobs.progress.events import JobProgressEvent
from matrixjobs.schedules import ScheduleInfo

STATUS_STYLE = {
    Status.PENDING: "yellow",
    Status.PROCESSING: "cyan",
    Status.COMPLETED: "green",
    Status.FAILED: "red",
    Status.CANCELLED: "magenta",
}


class Mode(enum.StrEnum):
    LIVE = "live"  # a terminal: rich tables and live progress bars
    PLAIN = "plain"  # pipes, CI logs: one line per update
    JSON = "json"  # one job-progress event (JSON) per line


def pick_mode(json_output: bool, stream: TextIO | None = None) -> Mode:
    if json_output:
        return Mode.JSON
    return Mode.LIVE if Console(file=stream or sys.stdout).is_terminal else Mode.PLAIN


# -- text pieces ------------------------------------------------------------------------------


def detail_text(event: JobProgressEvent) -> str:
    """Counts, current operation, message and error: everything but status and percentage."""
    parts = [wording.counts(event)]
    if event.trigger is not None:
        parts.append(wording.started_by(event.trigger))
    batch = event.batch_details
    if batch is not None:
        if batch.failed_operations:
            parts.append(f"{batch.failed_operations} failed")
        if batch.cancelled_operations:
            parts.append(f"{batch.cancelled_operations} cancelled")
        if batch.current_operation:
            parts.append(f"now: {batch.current_operation}")
    if event.approval is not None:
        parts.append(wording.approval_state(event.approval))
    if event.message:
        parts.append(event.message)
    if event.error:
        parts.append(f"error: {event.error}")
    return " · ".join(part for part in parts if part)


def plain_line(event: JobProgressEvent) -> str:
    pieces = [event.id, event.type, event.name, event.status.value, wording.shown_percent(event),
              detail_text(event), wording.eta(event)]
    return " ".join(piece for piece in pieces if piece)


def signature(event: JobProgressEvent) -> tuple[object, ...]:
    """What makes an update worth showing (timestamps and ETA alone are not)."""
    return (event.status, event.progress, event.message, event.batch_details, event.error,
            event.approval)


# -- one-shot output (status, jobs, submit, cancel) --------------------------------------------


def print_events(events: Iterable[JobProgressEvent], mode: Mode, title: str = "") -> None:
    events = list(events)
    if mode is Mode.JSON:
        for event in events:
            print(event.to_json(), flush=True)
        return
    if mode is Mode.PLAIN:
        for event in events:
            print(plain_line(event), flush=True)
        return
    console = Console()
    if not events:
        console.print(f"[dim]{title or 'nothing'}: none[/dim]")
        return
    table = Table(title=title or None, title_justify="left")
    for column in ("id", "name", "status", "progress", "details", "ETA"):
        table.add_column(column, overflow="fold")
    for event in events:
        style = STATUS_STYLE.get(event.status, "")
        table.add_row(event.id, event.name, f"[{style}]{event.status.value}[/{style}]",
                      wording.shown_percent(event), detail_text(event), wording.eta(event))
    console.print(table)


def print_workers(workers: list[WorkerState], mode: Mode, now: float) -> None:
    if mode is Mode.JSON:
        print(f'{{"workers":[{",".join(worker.to_json() for worker in workers)}]}}', flush=True)
        return
    if mode is Mode.PLAIN:
        for worker in workers:
            print(" ".join((worker.name, worker.host, worker.role, ",".join(worker.labels) or "-",
                            wording.load(worker), wording.age(worker.heartbeat_at, now),
                            wording.liveness(worker))), flush=True)
        return
    console = Console()
    if not workers:
        console.print("[dim]workers: none[/dim]")
        return
    table = Table(title="workers", title_justify="left")
    for column in ("name", "host", "role", "labels", "running", "last heartbeat", "state"):
        table.add_column(column, overflow="fold")
    for worker in workers:
        style = "green" if worker.alive else "red"
        table.add_row(worker.name, worker.host, worker.role, ", ".join(worker.labels),
                      wording.load(worker), wording.age(worker.heartbeat_at, now),
                      f"[{style}]{wording.liveness(worker)}[/{style}]")
    console.print(table)


def print_schedules(schedules: list[ScheduleInfo], mode: Mode) -> None:
    if mode is Mode.JSON:
        print(f'{{"schedules":[{",".join(info.to_json() for info in schedules)}]}}',
              flush=True)
        return
    if mode is Mode.PLAIN:
        for info in schedules:
            print(wording.schedule(info), flush=True)
        return
    console = Console()
    if not schedules:
        console.print("[dim]schedules: none[/dim]")
        return
    table = Table(title="schedules", title_justify="left")
    for column in ("name", "cron", "starts", "next run", "last run"):
        table.add_column(column, overflow="fold")
    for info in schedules:
        when = wording.schedule_when(info)
        style = STATUS_STYLE.get(info.last_status, "dim") if info.last_status else "dim"
        table.add_row(info.name, f"{info.cron} ({info.timezone})",
                      " ".join([*info.targets, *info.args]),
                      f"[yellow]{when}[/yellow]" if info.paused else when,
                      f"[{style}]{wording.schedule_last(info)}[/{style}]")
    console.print(table)


# -- following updates (--watch, --wait) -------------------------------------------------------


class Board:
    """The latest state of every followed job and batch, shown as updates arrive.

    Updates come from streams and from polling; an older or repeated state never
    replaces a newer one, and nothing replaces a terminal state.
    """

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.latest: dict[str, JobProgressEvent] = {}
        self._shown: dict[str, tuple[object, ...]] = {}
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> Board:
        if self.mode is Mode.LIVE:
            self._progress = Progress(
                TextColumn("{task.fields[label]}"),
                BarColumn(bar_width=30),
                TextColumn("{task.fields[percent]:>6}"),
                TextColumn("{task.fields[status]}"),
                TextColumn("{task.fields[detail]}"),
                TextColumn("[dim]{task.fields[eta]}"),
                refresh_per_second=8,
            )
            self._progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def update(self, event: JobProgressEvent) -> bool:
        """Merge `event` in; True if it changed what is shown."""
        known = self.latest.get(event.id)
        if known is not None and (
            known.terminal or (event.updated_at < known.updated_at and not event.terminal)
        ):
            return False
        self.latest[event.id] = event
        mark = signature(event)
        if self._shown.get(event.id) == mark:
            if self._progress is not None:
                self._render(event)  # the ETA moves even when nothing else does
            return False
        self._shown[event.id] = mark
        if self.mode is Mode.JSON:
            print(event.to_json(), flush=True)
        elif self.mode is Mode.PLAIN:
            print(plain_line(event), flush=True)
        else:
            self._render(event)
        return True

    def note(self, text: str) -> None:
        """A remark outside the updates (stderr, so NDJSON on stdout stays clean)."""
        if self._progress is not None:
            self._progress.console.print(f"[dim]{text}[/dim]")
        else:
            print(text, file=sys.stderr, flush=True)

    def _render(self, event: JobProgressEvent) -> None:
        assert self._progress is not None
        style = STATUS_STYLE.get(event.status, "")
        total = None
        completed = 0.0
        if event.progress is not None and event.progress.percentage is not None:
            total, completed = 100.0, event.progress.percentage
        elif event.status is Status.COMPLETED:
            total, completed = 100.0, 100.0
        fields = {
            "label": f"{event.id} {event.name}",
            "percent": wording.shown_percent(event),
            "status": f"[{style}]{event.status.value}[/{style}]",
            "detail": detail_text(event),
            "eta": wording.eta(event),
        }
        task = self._tasks.get(event.id)
        if task is None:
            self._tasks[event.id] = self._progress.add_task(
                "", total=total, completed=completed, **fields
            )
        else:
            self._progress.update(task, total=total, completed=completed, **fields)

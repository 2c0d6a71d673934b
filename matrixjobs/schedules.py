"""A schedule as every view shows it (JSON in camelCase): its config, its next run in its
own time zone, whether it is paused and by whom, and its last job with how that went.

The API answers it, the CLI and MCP read it back, the room words it.
"""

from __future__ import annotations

from datetime import datetime

from matrixjobs.config import ScheduleConfig
from matrixjobs.models import Batch, Job, ScheduleState, Status
from matrixjobs.progress.events import CamelModel


class ScheduleInfo(CamelModel):
    name: str
    cron: str
    timezone: str
    # The next slot in the schedule's zone (2026-03-29T03:00:00+02:00); null while paused.
    next_run: datetime | None
    target: str | None
    batch: list[str] | None
    args: list[str]
    room: str | None
    missed: str
    paused: bool
    paused_by: str | None
    paused_at: datetime | None
    last_run: datetime | None  # the slot its last job was started for, in its zone
    last_job: str | None
    # How the last job (or batch) stands: pending, processing, then its outcome; null if
    # none ran yet or retention removed it.
    last_status: Status | None

    def to_json(self) -> str:
        # Unlike events, the nulls are part of the answer ("not paused", "none yet").
        return self.model_dump_json(by_alias=True)

    @property
    def targets(self) -> list[str]:
        return [self.target] if self.target is not None else list(self.batch or ())


def schedule_info(name: str, config: ScheduleConfig, state: ScheduleState | None,
                  last: Job | Batch | None, now: float) -> ScheduleInfo:
    """`last`: the work its last fired slot started, if the store still has it."""
    cron = config.when
    paused = state is not None and state.paused
    last_run = last.trigger.slot if last is not None and last.trigger is not None else None
    return ScheduleInfo(
        name=name, cron=config.cron, timezone=config.timezone,
        next_run=None if paused else cron.local(cron.next_after(now)),
        target=config.target, batch=config.batch, args=config.args, room=config.room,
        missed=config.missed, paused=paused,
        paused_by=state.paused_by if state is not None else None,
        paused_at=(cron.local(state.paused_at)
                   if state is not None and state.paused_at is not None else None),
        last_run=None if last_run is None else cron.local(last_run),
        last_job=state.last_job if state is not None else None,
        last_status=None if last is None else last.status,
    )

"""The schedule loop: starts each [schedules.NAME]'s work at its cron slots, once a slot
across every node sharing the store.

Every node runs it. A slot's work is started with the dedupe key
"schedule:NAME:<slot epoch>": the store keeps such keys unique, so of the nodes racing
for a slot one starts the work and the others learn which job it started. The
`schedules` table keeps what all nodes share: the last slot dealt with, its job, a pause.
The transaction that starts a slot's work reads the pause again and records the slot
(Store.add_jobs): a pause committed after the loop looked still stops the slot.

The loop sleeps until the next slot of any schedule (at most MAX_SLEEP_S: the wall clock
may be set, or the host suspended, meanwhile). A slot reached more than LATE_S after its
time (the node was down, the store out) was missed: `missed = "latest"` starts the
latest missed slot once, `"skip"` waits for the next. A new schedule starts nothing for
the slots before it was first seen, nor does one whose cron or time zone changed since its
last slot (the store keeps what that slot was read from) for the slots before a node
with the new config started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from matrixjobs.config import ScheduleConfig
from matrixjobs.errors import (
    AlreadySubmittedError,
    MatrixJobsError,
    ShuttingDownError,
    SlotHeldError,
    StoreUnavailableError,
)
from matrixjobs.logs import Outage
from matrixjobs.models import Batch, Job, ScheduleState, Trigger, TriggerKind
from matrixjobs.store import Store
from matrixjobs.supervisor import stop_if_cancelled

log = logging.getLogger(__name__)

LATE_S = 30.0
MAX_SLEEP_S = 60.0
RETRY_S = 5.0  # a store in trouble: try again this often


class Starter(Protocol):
    """App.trigger."""

    async def __call__(self, trigger: Trigger, *, target: str | None = None,
                       batch: Sequence[str] = (), args: Sequence[str] = (),
                       room: str | None = None, dedupe_key: str | None = None) -> Job | Batch:
        ...


def dedupe_key(name: str, slot: float) -> str:
    return f"schedule:{name}:{int(slot)}"


def _basis(config: ScheduleConfig) -> tuple[str, str]:
    """What a schedule's slots are read from: its cron (spaces evened) and time zone."""
    return " ".join(config.cron.split()), config.timezone


class Scheduler:
    def __init__(self, schedules: Mapping[str, ScheduleConfig], store: Store, start: Starter,
                 clock: Callable[[], float] = time.time) -> None:
        self._schedules = {name: (config, config.when) for name, config in schedules.items()}
        self._store = store
        self._start = start
        self._clock = clock
        self._seen: dict[str, float] = {}  # the latest slot this node dealt with, by name
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look again now (a schedule was paused or resumed here)."""
        self._wake.set()

    async def run(self) -> None:
        outage = Outage(log, "schedules")
        while True:
            try:
                await self.step()
            except ShuttingDownError:
                return
            except Exception:
                outage.failed("schedules: a step failed; trying again every %gs", RETRY_S)
                await self._sleep(RETRY_S)
                continue
            finally:
                stop_if_cancelled()
            outage.worked()
            await self._sleep(self.next_slot() - self._clock())

    def next_slot(self) -> float:
        now = self._clock()
        return min(cron.next_after(now) for _, cron in self._schedules.values())

    async def step(self) -> None:
        """Deal with each schedule's latest slot that this node has not yet dealt with."""
        now = self._clock()
        due = {name: latest for name, (_, cron) in self._schedules.items()
               if (latest := cron.latest_at(now)) > self._seen.get(name, float("-inf"))}
        if not due:
            return
        states = {state.name: state for state in await self._store.schedule_states()}
        for name, slot in due.items():
            await self._deal(name, slot, states.get(name), now)
            self._seen[name] = slot

    async def _deal(self, name: str, slot: float, state: ScheduleState | None,
                    now: float) -> None:
        config, cron = self._schedules[name]
        if state is None or state.last_slot is None:
            # First seen: it starts with the next slot.
            await self._store.rebase_schedule(name, slot, *_basis(config))
            return
        if name not in self._seen and await self._changed(name, config, slot, state):
            return
        if state.paused or slot <= state.last_slot:
            return  # paused, or dealt with by another node
        when = cron.local(slot).isoformat()
        if now - slot > LATE_S and config.missed == "skip":
            log.info("schedule %s: the %s run was missed; skipped (missed = \"skip\")",
                     name, when)
            await self._store.schedule_done(name, slot, None)
            return
        await self._fire(name, config, slot, when)

    async def _changed(self, name: str, config: ScheduleConfig, slot: float,
                       state: ScheduleState) -> bool:
        """At this node's start: whether the cron or zone changed since the last slot was
        read. If so its slots so far are dealt with: the slot now latest was never one of
        the schedule as it ran, so it is not a missed run; the next slot is its first."""
        basis = _basis(config)
        if (state.cron, state.timezone) == basis:
            return False
        if state.cron is None:  # recorded before matrixjobs kept the cron: as it was
            await self._store.rebase_schedule(name, state.last_slot or slot, *basis)
            return False
        log.info("schedule %s: changed from '%s %s' to '%s %s' since its last slot; it "
                 "starts afresh from its next slot (no missed run)", name, state.cron,
                 state.timezone, *basis)
        await self._store.rebase_schedule(name, slot, *basis)
        return True

    async def _fire(self, name: str, config: ScheduleConfig, slot: float, when: str) -> None:
        """Start the slot's work; the store records the slot in the same transaction."""
        try:
            item = await self._start(
                Trigger(TriggerKind.SCHEDULE, name, slot=slot,
                        timezone=config.timezone), target=config.target,
                batch=config.batch or (), args=config.args, room=config.room,
                dedupe_key=dedupe_key(name, slot))
        except AlreadySubmittedError:
            return  # another node was first, and recorded the slot
        except SlotHeldError as exc:
            log.info("schedule %s: the %s run was not started: %s", name, when, exc)
            return
        except (StoreUnavailableError, ShuttingDownError):
            raise  # the loop tries again, or ends
        except MatrixJobsError as exc:
            # Refused for good (a busy group that skips, a batch too large): the slot is
            # over; trying again each few seconds would only say it again.
            log.warning("schedule %s: the %s run was not started: %s", name, when, exc)
            await self._store.schedule_done(name, slot, None)
            return
        log.info("schedule %s: the %s run started %s", name, when, item.id)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(max(seconds, 0.0), MAX_SLEEP_S)):
                await self._wake.wait()
        self._wake.clear()

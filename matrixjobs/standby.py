"""Hot standby: a component that runs on one node at a time among those sharing the store.

Every `matrixjobs run` node sharing a PostgreSQL store with the same bot account wraps its
Matrix bot in `HotStandby`. The node that takes the store's role (`Store.try_lead`) runs
the bot; the others serve the API and MCP, run jobs, and try again every `RETRY_S`. The
leader checks that it still holds the role every `lease_s/6`; once the check fails (or
has not been answered for `lease_s/3`: the store gives up itself) it drops the bot at
once, without sending what was left to send, so two nodes never both answer. What the
new leader needs is in the store: the progress messages to keep editing (the message
map) and the events already acted on (dedupe keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable
from typing import Protocol

from matrixjobs.app import Component
from matrixjobs.errors import StoreError
from matrixjobs.store import Store

log = logging.getLogger(__name__)

BOT_ROLE = "matrix-bot"
RETRY_S = 2.0


class Droppable(Component, Protocol):
    async def drop(self) -> None:
        """Stop at once without sending anything more: another node is taking over."""


class Standing(enum.StrEnum):
    LEADING = "leading"
    STANDBY = "standby"


class HotStandby:
    """Runs the component `make()` builds while this process holds `role` in `store`."""

    def __init__(self, store: Store, role: str, lease_s: float,
                 make: Callable[[], Droppable]) -> None:
        self.store = store
        self.role = role
        self.lease_s = lease_s
        self.make = make
        self.current: Droppable | None = None  # the component, while leading
        self.standing = Standing.STANDBY
        self._decided = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._holder: str | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"standby-{self.role}")

    async def ready(self) -> None:
        """Once this node stands by, or leads with its component ready: either way it serves."""
        await self._decided.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.current is not None:
            # A clean stop while leading: the component still holds the role, so it may
            # send what it has left (the final states of the jobs just stopped).
            current, self.current = self.current, None
            await current.stop()
        await self.store.resign(self.role)

    async def _run(self) -> None:
        retry_s = min(RETRY_S, self.lease_s / 3)
        while True:
            if await self._try_lead():
                await self._lead()
                # Lost: the standbys, which try every retry_s, get the first chance.
                await asyncio.sleep(retry_s)
            else:
                await self._stand_by()
            await asyncio.sleep(retry_s)

    async def _try_lead(self) -> bool:
        try:
            return await self.store.try_lead(self.role, self.lease_s)
        except StoreError as exc:
            log.warning("%s: %s; trying again", self.role, exc)
            return False

    async def _stand_by(self) -> None:
        holder = await self.store.leader(self.role)
        if self.standing is not Standing.STANDBY or holder != self._holder or (
                not self._decided.is_set()):
            log.info("bot: standing by (held by %s)", holder or "another process")
        self.standing, self._holder = Standing.STANDBY, holder
        self._decided.set()

    async def _lead(self) -> None:
        log.info("bot: leading")
        self.standing = Standing.LEADING
        self.current = self.make()
        await self.current.start()
        ready = asyncio.create_task(self.current.ready())
        ready.add_done_callback(lambda _: self._decided.set())
        try:
            while await self.store.leading(self.role):
                await asyncio.sleep(self.lease_s / 6)
        finally:
            ready.cancel()
        log.warning("bot: lost the lead; stopping the bot without sending anything more")
        current, self.current = self.current, None
        self.standing = Standing.STANDBY
        await current.drop()

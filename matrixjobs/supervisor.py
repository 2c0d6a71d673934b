"""Small named background loops that log their failures and keep going: a store in
trouble in one line, a bug with its traceback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from matrixjobs.logs import Outage, brief
from matrixjobs.store.health import troubled

log = logging.getLogger(__name__)

# How long a cancelled task may take to end before it is cancelled again.
RECANCEL_S = 0.5


def stop_if_cancelled() -> None:
    """End a loop whose cancel a library lost: Python 3.11's asyncio.wait_for returns the
    result when the awaited thing completes at the moment of the cancel (psycopg_pool
    waits for a connection that way), so a stop that cancelled every loop just as the
    store came back found this one asleep again, and waited for it for ever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Supervisor:
    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def every(self, name: str, seconds: float, step: Callable[[], Awaitable[None]]) -> None:
        """Run `step` every `seconds` until stopped; an exception is logged, not fatal."""

        async def loop() -> None:
            outage = Outage(log, name, troubled)
            while True:
                await asyncio.sleep(seconds)
                try:
                    await step()
                except Exception:
                    outage.failed("%s failed; trying again every %gs", name, seconds)
                    continue
                finally:
                    stop_if_cancelled()
                outage.worked()

        self._tasks.append(asyncio.create_task(loop(), name=name))

    def once(self, name: str, step: Callable[[], Awaitable[None]]) -> None:
        """Run `step` once, now, in the background; an exception is logged, not fatal."""

        async def run() -> None:
            try:
                await step()
            except Exception as exc:
                log.warning("%s failed%s", name, _said(exc), exc_info=not troubled(exc))

        task = asyncio.create_task(run(), name=name)
        self._tasks.append(task)
        task.add_done_callback(lambda done: done in self._tasks and self._tasks.remove(done))

    def keep(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run a long-lived coroutine; restart it a second after it crashes."""

        async def loop() -> None:
            while True:
                try:
                    await run()
                    return
                except Exception as exc:
                    log.error("%s crashed%s; restarting", name, _said(exc),
                              exc_info=not troubled(exc))
                    await asyncio.sleep(1)

        self._tasks.append(asyncio.create_task(loop(), name=name))

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        self._tasks.clear()


async def cancel_all(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait for them to end, cancelling again any that goes on: a
    library may lose a cancel (see `stop_if_cancelled`), and a stop must not wait on it."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
        if pending:
            log.debug("cancelling again: %s", ", ".join(task.get_name() for task in pending))


def _said(exc: BaseException) -> str:
    """A store in trouble, said in the line itself (it gets no traceback)."""
    return f" ({brief(exc)})" if troubled(exc) else ""

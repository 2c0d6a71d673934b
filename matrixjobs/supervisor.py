"""Small named background loops that log their failures and keep going."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def every(self, name: str, seconds: float, step: Callable[[], Awaitable[None]]) -> None:
        """Run `step` every `seconds` until stopped; an exception is logged, not fatal."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(seconds)
                try:
                    await step()
                except Exception:
                    log.exception("%s failed; will try again in %gs", name, seconds)

        self._tasks.append(asyncio.create_task(loop(), name=name))

    def keep(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run a long-lived coroutine; restart it a second after it crashes."""

        async def loop() -> None:
            while True:
                try:
                    await run()
                    return
                except Exception:
                    log.exception("%s crashed; restarting", name)
                    await asyncio.sleep(1)

        self._tasks.append(asyncio.create_task(loop(), name=name))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

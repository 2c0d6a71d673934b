"""One consumer's view of the event stream, with a bounded, coalescing buffer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType

from matrixjobs.progress.events import JobProgressEvent


class Subscription:
    """An async iterator of events, optionally for one id.

    The buffer keeps at most one pending event per id: a consumer that falls
    behind skips intermediate states but still gets the latest. When more than
    `max_pending` ids wait, the oldest non-terminal one is dropped, so terminal
    events are kept before anything else. Only a consumer that stops reading
    altogether can pile up more than `TERMINAL_FACTOR * max_pending` terminal
    events; past that the oldest go and `missed` counts them (re-read state when
    it is non-zero). Every operation is O(1): a stalled consumer costs the
    publisher nothing more than a quick one. A subscription to one id ends after
    delivering that id's terminal event.
    """

    TERMINAL_FACTOR = 10

    def __init__(
        self,
        subject: str | None,
        max_pending: int,
        on_close: Callable[[Subscription], None],
    ) -> None:
        self.subject = subject
        self.max_pending = max_pending
        self.missed = 0
        self._pending: dict[str, JobProgressEvent] = {}
        # Ids in _pending whose event is not terminal, oldest first (a dict as ordered set).
        self._droppable: dict[str, None] = {}
        self._wakeup = asyncio.Event()
        self._closed = False
        self._on_close = on_close

    def offer(self, event: JobProgressEvent) -> None:
        if self._closed:
            return
        key = event.id
        pending = self._pending
        if key not in pending:
            if len(pending) >= self.max_pending and self._droppable:
                del pending[self._drop_oldest(self._droppable)]
            elif len(pending) >= self.TERMINAL_FACTOR * self.max_pending:
                del pending[next(iter(pending))]
                self.missed += 1
        pending[key] = event
        if event.terminal:
            self._droppable.pop(key, None)
        else:
            self._droppable[key] = None
        self._wakeup.set()

    @staticmethod
    def _drop_oldest(droppable: dict[str, None]) -> str:
        key = next(iter(droppable))
        del droppable[key]
        return key

    def take_all(self) -> list[JobProgressEvent]:
        """Everything waiting, oldest first, without blocking."""
        events = list(self._pending.values())
        self._pending.clear()
        self._droppable.clear()
        if self.subject is not None and any(event.terminal for event in events):
            self.close()
        return events

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._on_close(self)
            self._wakeup.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> JobProgressEvent:
        while not self._pending:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        key = next(iter(self._pending))
        event = self._pending.pop(key)
        self._droppable.pop(key, None)
        if self.subject is not None and event.terminal:
            self.close()
        return event

    async def __aenter__(self) -> Subscription:
        return self

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

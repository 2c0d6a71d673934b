"""One consumer's view of the event stream, with a bounded, coalescing buffer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType

from matrixjobs.progress.events import JobProgressEvent


class Subscription:
    """An async iterator of events, optionally for one id.

    The buffer keeps at most one pending event per id: a consumer that falls
    behind skips intermediate states but still gets the latest, and terminal
    events are only ever replaced by nothing. When more than `max_pending` ids
    wait, the oldest non-terminal one is dropped; if even terminal events pile
    up past `4 * max_pending`, the subscription ends with `overflowed = True`
    so the consumer can re-read state instead of being fed an unbounded backlog.
    A subscription to one id ends after delivering that id's terminal event.
    """

    def __init__(
        self,
        subject: str | None,
        max_pending: int,
        on_close: Callable[[Subscription], None],
    ) -> None:
        self.subject = subject
        self.max_pending = max_pending
        self.overflowed = False
        self._pending: dict[str, JobProgressEvent] = {}
        self._wakeup = asyncio.Event()
        self._closed = False
        self._on_close = on_close

    def offer(self, event: JobProgressEvent) -> None:
        if self._closed:
            return
        pending = self._pending
        if event.id not in pending and len(pending) >= self.max_pending:
            self._drop_oldest_progress()
            if len(pending) >= 4 * self.max_pending:
                self.overflowed = True
                self.close()
                return
        pending[event.id] = event
        self._wakeup.set()

    def _drop_oldest_progress(self) -> None:
        for key, queued in self._pending.items():
            if not queued.terminal:
                del self._pending[key]
                return

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

"""NDJSON progress streams: one job-progress event per line, closed without leaks.

A stream ends when its job or batch ends, when the client goes away, or when
the server shuts down. In every case the core's watch generator (and with it
the monitor subscription) is closed before the request's task finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from starlette.types import Message, Receive, Scope, Send

from matrixjobs.progress.events import JobProgressEvent

NDJSON = "application/x-ndjson"
HEADERS = [
    (b"content-type", NDJSON.encode()),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell nginx & co. not to buffer the stream
]


class OpenStreams:
    """The streams being served, so shutdown can end them all at once."""

    def __init__(self) -> None:
        self._deadlines: set[asyncio.Timeout] = set()
        self.closing = False

    def __len__(self) -> int:
        return len(self._deadlines)

    def add(self, deadline: asyncio.Timeout) -> None:
        self._deadlines.add(deadline)

    def discard(self, deadline: asyncio.Timeout) -> None:
        self._deadlines.discard(deadline)

    def close_all(self) -> None:
        self.closing = True
        now = asyncio.get_running_loop().time()
        for deadline in self._deadlines:
            deadline.reschedule(now)


class EventStream:
    """An ASGI response that writes `first`, then everything `updates` yields."""

    def __init__(
        self,
        first: JobProgressEvent,
        updates: AsyncGenerator[JobProgressEvent, None],
        streams: OpenStreams,
    ) -> None:
        self.first = first
        self.updates = updates
        self.streams = streams
        self.client_gone = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            await send(_line(self.first))
            if not self.first.terminal and not self.streams.closing:
                await self._follow(receive, send)
        finally:
            await self.updates.aclose()
        if not self.client_gone:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _follow(self, receive: Receive, send: Send) -> None:
        # Ended early by rescheduling the deadline: on disconnect or shutdown.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(None) as deadline:
                self.streams.add(deadline)
                listener = asyncio.create_task(self._until_disconnect(receive, deadline))
                try:
                    async for event in self.updates:
                        await send(_line(event))
                finally:
                    self.streams.discard(deadline)
                    listener.cancel()

    async def _until_disconnect(self, receive: Receive, deadline: asyncio.Timeout) -> None:
        message: Message = {}
        while message.get("type") != "http.disconnect":
            message = await receive()
        self.client_gone = True
        deadline.reschedule(asyncio.get_running_loop().time())


def _line(event: JobProgressEvent) -> Message:
    return {"type": "http.response.body", "body": (event.to_json() + "\n").encode(),
            "more_body": True}

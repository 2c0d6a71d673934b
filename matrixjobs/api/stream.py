"""Streamed responses, closed without leaks: NDJSON progress (one job-progress event
per line) and a job's log as text while it is written.

A stream ends when its job or batch (or the followed run) ends, when the client goes away, or when
the server shuts down. In every case the core's watch generator (and with it
the monitor subscription) is closed before the request's task finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Generic, TypeVar

from starlette.types import Message, Receive, Scope, Send

from matrixjobs.progress.events import JobProgressEvent

NDJSON = "application/x-ndjson"
HEADERS = [
    (b"content-type", NDJSON.encode()),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell nginx & co. not to buffer the stream
]
T = TypeVar("T")
TEXT = "text/plain; charset=utf-8"
TEXT_HEADERS = [(b"content-type", TEXT.encode()), *HEADERS[1:]]


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


class LiveResponse:
    """What every streamed answer shares: it ends at once when the client goes away or the
    service stops (OpenStreams), and says nothing more to a client that left."""

    def __init__(self, streams: OpenStreams) -> None:
        self.streams = streams
        self.client_gone = False
        self._deadline: asyncio.Timeout | None = None

    def end_now(self) -> None:
        """End the stream at its next step (e.g. a reader too slow to keep up)."""
        if self._deadline is not None:
            self._deadline.reschedule(asyncio.get_running_loop().time())

    async def pump(self, receive: Receive, send: Send, chunks: AsyncGenerator[bytes, None]
                   ) -> None:
        """Send `chunks` until they end, the client leaves or the service stops."""
        # Ended early by rescheduling the deadline: on disconnect or shutdown.
        with contextlib.suppress(TimeoutError):
            async with contextlib.aclosing(chunks), asyncio.timeout(None) as deadline:
                self._deadline = deadline
                self.streams.add(deadline)
                listener = asyncio.create_task(self._until_disconnect(receive, deadline))
                try:
                    async for chunk in chunks:
                        await send(body(chunk))
                finally:
                    self.streams.discard(deadline)
                    listener.cancel()

    async def finish(self, send: Send) -> None:
        if not self.client_gone:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _until_disconnect(self, receive: Receive, deadline: asyncio.Timeout) -> None:
        message: Message = {}
        while message.get("type") != "http.disconnect":
            message = await receive()
        self.client_gone = True
        deadline.reschedule(asyncio.get_running_loop().time())


class ChunkStream(LiveResponse, Generic[T]):
    """An ASGI response that writes `first`, then (with `follow`) every item `rest`
    yields as `encode` turns it into bytes."""

    def __init__(
        self,
        first: bytes,
        rest: AsyncGenerator[T, None],
        encode: Callable[[T], bytes],
        follow: bool,
        streams: OpenStreams,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        super().__init__(streams)
        self.first = first
        self.rest = rest
        self.encode = encode
        self.follow = follow
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            await send(body(self.first))
            if self.follow and not self.streams.closing:
                await self.pump(receive, send, self._encoded())
        finally:
            await self.rest.aclose()
        await self.finish(send)

    async def _encoded(self) -> AsyncGenerator[bytes, None]:
        async for item in self.rest:
            if chunk := self.encode(item):
                yield chunk


def event_stream(
    first: JobProgressEvent,
    updates: AsyncGenerator[JobProgressEvent, None],
    streams: OpenStreams,
) -> ChunkStream[JobProgressEvent]:
    """NDJSON: `first`, then every update (none when `first` is terminal)."""
    return ChunkStream(_line(first), updates, _line, not first.terminal, streams, HEADERS)


def text_stream(first: str, rest: AsyncGenerator[str, None],
                streams: OpenStreams) -> ChunkStream[str]:
    """text/plain: `first`, then each piece of `rest` as it comes (a log being written)."""
    return ChunkStream(first.encode(), rest, str.encode, True, streams, TEXT_HEADERS)


def _line(event: JobProgressEvent) -> bytes:
    return (event.to_json() + "\n").encode()


def body(chunk: bytes) -> Message:
    return {"type": "http.response.body", "body": chunk, "more_body": True}

"""The dashboard's live stream: `GET /v1/events`, server-sent events for every job and batch.

One monitor subscription serves every open page: each event is worded and
encoded once, then handed to each page's buffer. A stream starts with
`event: snapshot` (active jobs and batches, recent finished ones, and the
`focus` id with a batch's operations), then sends `event: update` per progress
event and `event: refresh` for an active item that had no update for
`REFRESH_S`, so its "12s elapsed" keeps moving without the page polling or
wording anything itself. Every message is `{"event": <job-progress event>,
"text": {...}, "sentAt": epoch s}` (a snapshot: `{"items": [...], "health", "sentAt"}`).
The store's state goes with the snapshot and as `event: health` whenever it changes:
`{"status": "ok"}`, or `{"status": "degraded", "reason": "store: locked", "text": <the
one line the page shows>}` (progress/wording.py words it, as for the room and the CLI).

Reconnecting (EventSource does it after `retry`) always starts with a fresh
snapshot; `Last-Event-ID` is ignored, as a snapshot is both cheaper than a
replay buffer and always right. A page whose unread backlog passes
`CLIENT_LIMIT_BYTES` is cut off at once and resyncs the same way; at most `MAX_PAGES`
streams are open at a time. Queued work is refreshed every `PENDING_REFRESH_S` (its
"queued for" moves in those steps), running work every `REFRESH_S`.
A comment line every `KEEPALIVE_S` keeps proxies from cutting an idle stream;
shutdown ends every stream with a complete response (OpenStreams).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable

from starlette.types import Receive, Scope, Send

from matrixjobs.api.stream import LiveResponse, OpenStreams, body
from matrixjobs.app import ACTIVE, App
from matrixjobs.errors import NotFoundError
from matrixjobs.models import BATCH_PREFIX, Status
from matrixjobs.progress import wording
from matrixjobs.progress.events import JobProgressEvent
from matrixjobs.progress.subscription import Subscription

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
REFRESH_S = 1.0
# Hundreds of queued jobs refreshed every second would be most of the stream.
PENDING_REFRESH_S = 10.0
KEEPALIVE_S = 15.0
RETRY_MS = 2000
CLIENT_LIMIT_BYTES = 1024 * 1024  # a page's unread backlog before it is cut off
CHUNK_BYTES = 64 * 1024  # at most this much in one write to a page
MAX_PAGES = 100  # open event streams; more get 503
RECENT_JOBS = 50
RECENT_BATCHES = 20
ACTIVE_LIMIT = 1000
KEEPALIVE = b": keep-alive\n\n"


def texts(event: JobProgressEvent, now: float) -> dict[str, object]:
    """What the page shows, worded here (progress/wording.py), never in the page."""
    return {
        "status": wording.STATUS_WORD[event.status],
        "percent": wording.shown_percent(event),
        "bar": wording.shown_percentage(event),
        "counts": wording.counts(event),
        "eta": wording.eta(event),
        "timing": wording.timing(event, now),
        "attempt": wording.attempt(event),
        "approval": "" if event.approval is None else wording.approval_state(event.approval),
        "awaiting": wording.awaiting_approval(event),
        "startedBy": "" if event.trigger is None else wording.started_by(event.trigger),
    }


def item_json(event: JobProgressEvent, now: float, stamped: bool = False) -> str:
    """An item of a snapshot; `stamped`: a message of its own, with the time it was worded."""
    stamp = f',"sentAt":{now}' if stamped else ""
    return f'{{"event":{event.to_json()},"text":{json.dumps(texts(event, now))}{stamp}}}'


def health_json(app: App) -> str:
    """The store's state for the page's banner: nothing to show while it takes writes."""
    health = app.health
    if health.up:
        return '{"status":"ok"}'
    return json.dumps({"status": "degraded", "reason": health.reason,
                       "text": wording.degraded(health.reason)})


def sse_message(kind: str, seq: int, data: str) -> bytes:
    return f"id: {seq}\nevent: {kind}\ndata: {data}\n\n".encode()


class FeedClient:
    """One page's buffer of encoded messages, at most `limit_bytes`: a page that does not
    read (a frozen tab, a stalled connection) overflows it and is cut off at once (it
    resyncs with a new snapshot when it reconnects), so its backlog cannot grow."""

    def __init__(self, limit_bytes: int = CLIENT_LIMIT_BYTES) -> None:
        self.limit_bytes = limit_bytes
        self.overflowed = False
        self.on_overflow: Callable[[], None] = lambda: None
        self._messages: deque[bytes] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()

    def put(self, message: bytes) -> None:
        if self.overflowed:
            return
        if self._bytes + len(message) > self.limit_bytes:
            self.overflowed = True
            self._messages.clear()
            self._bytes = 0
            self.on_overflow()
        else:
            self._messages.append(message)
            self._bytes += len(message)
        self._ready.set()

    async def take(self, wait_s: float) -> bytes:
        """What is waiting, as one write of at most CHUNK_BYTES (a stalled connection then
        holds no more than that); a keep-alive comment after `wait_s` of quiet."""
        if not self._messages:
            self._ready.clear()
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow the cancellation
            # that ends the stream (shutdown, disconnect) when a message lands at that moment.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._ready.wait()
        taken: list[bytes] = []
        size = 0
        while self._messages and (not taken or size + len(self._messages[0]) <= CHUNK_BYTES):
            message = self._messages.popleft()
            taken.append(message)
            size += len(message)
        self._bytes -= size
        return b"".join(taken) or KEEPALIVE


class DashboardFeed:
    """The shared half: runs while at least one page is connected."""

    def __init__(self, app: App, refresh_s: float = REFRESH_S) -> None:
        self.app = app
        self.refresh_s = refresh_s
        self.clients: set[FeedClient] = set()
        self._seq = 0
        # Active ids → (latest event, monotonic time it was last sent), for refreshes.
        self._active: dict[str, tuple[JobProgressEvent, float]] = {}
        self._subscription: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._health = health_json(app)  # as the pages were last told

    def join(self) -> FeedClient:
        """A new page's buffer; updates from now on land in it (before its snapshot is read,
        so nothing falls between the two)."""
        if not self.clients:
            self._health = health_json(self.app)
            self._subscription = self.app.monitor.subscribe()
            self._tasks = [asyncio.create_task(self._pump(self._subscription), name="feed"),
                           asyncio.create_task(self._refresh(), name="feed-refresh")]
        client = FeedClient()
        self.clients.add(client)
        return client

    def leave(self, client: FeedClient) -> None:
        self.clients.discard(client)
        if self.clients or self._subscription is None:
            return
        self._subscription.close()
        self._subscription = None
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        self._active.clear()

    async def snapshot(self, focus: str | None) -> bytes:
        events = await self._snapshot_events(focus)
        self.track(events)
        now = time.time()
        items = ",".join(item_json(event, now) for event in events)
        health = health_json(self.app)
        return sse_message("snapshot", self._next(),
                           f'{{"items":[{items}],"health":{health},"sentAt":{now}}}')

    def track(self, events: Iterable[JobProgressEvent]) -> None:
        """Refresh these active items too, though no update about them came yet. A snapshot's
        event can be newer than the last update (it reads the live state), and a page keeps
        the newest it has seen, so a refresh must carry at least that."""
        sent = time.monotonic()
        for event in events:
            known = self._active.get(event.id)
            if not event.terminal and (known is None or known[0].updated_at < event.updated_at):
                self._active[event.id] = (event, known[1] if known else sent)

    async def _snapshot_events(self, focus: str | None) -> list[JobProgressEvent]:
        app = self.app
        lists = [await app.batches(ACTIVE, ACTIVE_LIMIT), await app.jobs(ACTIVE, ACTIVE_LIMIT),
                 await app.batches(None, RECENT_BATCHES), await app.jobs(None, RECENT_JOBS)]
        found: dict[str, JobProgressEvent] = {}
        for item in (item for listed in lists for item in listed):
            if item.id not in found:
                found[item.id] = app.live(item)
        if focus is not None:
            found.update((event.id, event) for event in await self._focus_events(focus))
        return list(found.values())

    async def _focus_events(self, focus: str) -> list[JobProgressEvent]:
        """The page's own job or batch, however old, and a batch's operations."""
        try:
            events = [await self.app.status(focus)]
            if focus.startswith(BATCH_PREFIX):
                jobs = await self.app.jobs(None, ACTIVE_LIMIT, batch=focus)
                events.extend(self.app.live(job) for job in jobs)
        except NotFoundError:
            return []  # the page says so
        return events

    async def _pump(self, subscription: Subscription) -> None:
        async for event in subscription:
            if event.terminal:
                self._active.pop(event.id, None)
            else:
                self._active[event.id] = (event, time.monotonic())
            self._broadcast("update", event)

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s / 2)
            self._tell_health()
            now = time.monotonic()
            for event, sent in list(self._active.values()):
                every = self.refresh_s if event.status is Status.PROCESSING else PENDING_REFRESH_S
                if sent <= now - every:
                    self._active[event.id] = (event, time.monotonic())
                    self._broadcast("refresh", event)

    def _tell_health(self) -> None:
        """Every page learns when the store's state changes: its banner shows or goes."""
        health = health_json(self.app)
        if health != self._health:
            self._health = health
            self._send(sse_message("health", self._next(), health))

    def _broadcast(self, kind: str, event: JobProgressEvent) -> None:
        self._send(sse_message(kind, self._next(), item_json(event, time.time(), stamped=True)))

    def _send(self, message: bytes) -> None:
        for client in self.clients:
            client.put(message)

    def _next(self) -> int:
        self._seq += 1
        return self._seq


class SseStream(LiveResponse):
    """An ASGI response: `retry`, the snapshot, then the feed until disconnect or shutdown."""

    def __init__(self, feed: DashboardFeed, streams: OpenStreams, focus: str | None) -> None:
        super().__init__(streams)
        self.feed = feed
        self.focus = focus

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = self.feed.join()
        client.on_overflow = self.end_now
        try:
            snapshot = await self.feed.snapshot(self.focus)
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            await send(body(f"retry: {RETRY_MS}\n\n".encode() + snapshot))
            if not self.streams.closing:
                await self.pump(receive, send, _messages(client))
        finally:
            self.feed.leave(client)
        await self.finish(send)


async def _messages(client: FeedClient) -> AsyncGenerator[bytes, None]:
    """The client's messages (a keep-alive comment when there are none for a while),
    until it falls too far behind."""
    while not client.overflowed:
        yield await client.take(KEEPALIVE_S)

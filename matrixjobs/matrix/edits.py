"""The edit scheduler: one progress message per job or batch, kept current within budget.

Every send, edits included, counts against the homeserver's rate limit. The
scheduler keeps only the newest state per message (coalescing) and, when the
budget is short, sends what a person is waiting for first (`Rank`):

1. answers: replies to commands (results, refusals, errors) and a command's first
   progress message, in the order they were asked for;
2. final states, which are never dropped;
3. the rest: pings, failed jobs' log files, then progress edits round-robin.

It keeps back enough of its budget that every live message's final edit can go
out at once: pings, log files and progress edits never spend that reserve.
Answers, ranked above final states, may (a person is waiting for them; a final
edit then waits at most one refill for each answer that did), and the reserve
fills up again before anything of the third rank goes. Edits always target the
original event, carry the full `m.new_content`, and never exceed `max_edits` per
message.

A job that failed also gets its whole log as a file (`m.file`) in a thread
under its progress message, once the final edit is out: queued with the pings,
so it waits behind answers and final states and within the same budget, and the
progress message stays the job's only message in the room's timeline.

At debug level the scheduler says, one line each, why the most important send
still waiting waits and for how long (budget, reserve, interval, a 429's wait,
a pause after a failed send), each 429, and how long each answer and final state
took. The lines name jobs, rooms' events and reasons, never message text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

from matrixjobs.errors import NotFoundError, StoreUnavailableError
from matrixjobs.matrix.ratelimit import TokenBucket
from matrixjobs.matrix.render import Rendered, render_final_notice, render_progress
from matrixjobs.models import ProgressMessage, Status
from matrixjobs.progress.events import JobProgressEvent

log = logging.getLogger(__name__)

HTML = "org.matrix.custom.html"
MAX_REPLIES = 50
MAX_BACKOFF_S = 60.0
RATE_WARNING_EVERY_S = 60.0
FLUSH_POLL_S = 0.05  # while flushing, the shortest wait for budget or after a failed send
LOG_TYPE = "text/plain"
UNSAFE_IN_FILENAME = re.compile(r"[^A-Za-z0-9_.-]+")
PING_FAILED, PING_FIXED, PING_LONG = "failed", "fixed", "long"
# The longest a command's first message waits for its job to move on (see _first_due).
FIRST_MESSAGE_WAIT_S = 0.5


class Rank(IntEnum):
    """What goes first when the budget is short: the lowest rank."""

    ANSWER = 0  # a person waits for it: a reply to their command, a command's first message
    FINAL = 1  # a job's or batch's final state
    NOTICE = 2  # pings, log files and progress edits: never from the final edits' reserve


class RateLimitedError(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"rate limited for {retry_after_s:.1f}s")
        self.retry_after_s = retry_after_s


class SendFailedError(Exception):
    """A send that failed; `permanent` ones (forbidden, room gone) are not retried."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Sender(Protocol):
    async def send(self, room_id: str, content: dict[str, Any], txn_id: str) -> str:
        """Send an m.room.message; return its event id or raise one of the errors above.

        The homeserver sends a retried `txn_id` only once, so a send whose answer was
        lost can be repeated without posting twice.
        """

    async def upload(self, room_id: str, data: bytes, filename: str,
                     content_type: str) -> dict[str, Any]:
        """Upload a file for `room_id`; return the fields that point an m.file at it:
        `url`, or in an encrypted room `file` (the encrypted file's url and key). Raises
        like `send`."""


class SendCounter(Protocol):
    """Told of each message that went out, each edit and each 429 (the service's metrics)."""

    def matrix_sent(self) -> None: ...

    def matrix_edited(self) -> None: ...

    def matrix_rate_limited(self) -> None: ...



class MessageBook(Protocol):
    """Where each message's event id and edits are kept, so that edits go on targeting it
    after a restart (the service's App)."""

    async def save_message(self, message: ProgressMessage, now: float) -> None: ...

    async def update_message(self, subject_id: str, edits: int, final: bool) -> None: ...


@dataclass(slots=True)
class Slot:
    """One progress message: the state last shown and the newest state known."""

    subject_id: str
    room_id: str
    requester: str
    reply_to: str
    order: int
    latest: JobProgressEvent
    event_id: str | None = None
    shown: JobProgressEvent | None = None
    edits: int = 0
    last_sent: float = float("-inf")
    tracked_at: float = float("-inf")  # when its command asked for it (-inf: restored)
    ended_at: float = float("-inf")  # when its final state became known
    # The first message as first attempted: a retry must send the very same content,
    # since the homeserver may already have it under that transaction id.
    first: tuple[JobProgressEvent, Rendered] | None = None
    # Restored with no event id: the first send may repeat one from before the restart,
    # so what it shows is not known; follow it with an edit.
    unsure: bool = False

    @property
    def dirty(self) -> bool:
        return self.latest is not self.shown


@dataclass(slots=True)
class Reply:
    """An answer to a command (`answer`), or a notice nobody asked for just now (a ping)."""

    room_id: str
    reply_to: str
    rendered: Rendered
    mentions: list[str] = field(default_factory=list)
    answer: bool = True
    asked_at: float = 0.0
    txn_id: str = field(default_factory=lambda: f"mj-reply-{uuid.uuid4().hex}")


@dataclass(slots=True)
class Attachment:
    """A failed job's log, to go in a thread under its progress message."""

    room_id: str
    thread_root: str
    subject_id: str
    filename: str
    txn_id: str
    # Set once uploaded, so a retried send does not upload again.
    file: dict[str, Any] | None = None
    size: int = 0


@dataclass(frozen=True, slots=True)
class Wait:
    """A send that cannot go yet: in how many seconds it can, what it is, what holds it."""

    seconds: float
    rank: Rank
    what: str
    why: str


def log_filename(event: JobProgressEvent) -> str:
    """`j12-docs.log`: the job and what it ran, safe as a file name anywhere."""
    name = UNSAFE_IN_FILENAME.sub("_", event.name).strip("._")[:60]
    return f"{event.id}-{name}.log" if name else f"{event.id}.log"


def file_content(attachment: Attachment) -> dict[str, Any]:
    """An m.file in the thread under the progress message (spec "Threading"); clients
    without threads see it as a reply to that message."""
    return {
        "msgtype": "m.file",
        "body": attachment.filename,
        "filename": attachment.filename,
        "info": {"mimetype": LOG_TYPE, "size": attachment.size},
        **(attachment.file or {}),
        "m.mentions": {},
        "m.relates_to": {
            "rel_type": "m.thread",
            "event_id": attachment.thread_root,
            "is_falling_back": True,
            "m.in_reply_to": {"event_id": attachment.thread_root},
        },
    }


def message_content(rendered: Rendered, reply_to: str | None = None,
                    mentions: Sequence[str] = ()) -> dict[str, Any]:
    content: dict[str, Any] = {
        "msgtype": "m.notice",
        "body": rendered.body,
        "format": HTML,
        "formatted_body": rendered.html,
        "m.mentions": {"user_ids": list(mentions)} if mentions else {},
    }
    if reply_to is not None:
        content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
    return content


def edit_content(original_event_id: str, rendered: Rendered) -> dict[str, Any]:
    """A full replacement of the original (never of an edit), with the '* ' fallback."""
    new_content = {
        "msgtype": "m.notice",
        "body": rendered.body,
        "format": HTML,
        "formatted_body": rendered.html,
        "m.mentions": {},
    }
    return {
        "msgtype": "m.notice",
        "body": f"* {rendered.body}",
        "format": HTML,
        "formatted_body": f"* {rendered.html}",
        "m.new_content": new_content,
        "m.mentions": {},
        "m.relates_to": {"rel_type": "m.replace", "event_id": original_event_id},
    }


@dataclass(frozen=True, slots=True)
class Pings:
    """When a finished job or batch pings its requester (a reply mentioning them; the edit
    to its final state notifies nobody). `on` holds PING_FAILED (it failed), PING_FIXED (it
    completed, and the same work failed the last time it ran, as `previous` tells) and
    PING_LONG (it ran `long_s` or longer, whatever the outcome)."""

    on: Collection[str] = (PING_FAILED, PING_FIXED, PING_LONG)
    long_s: float = 30.0
    previous: Callable[[str], Awaitable[Status | None]] | None = None

    async def fixed(self, event: JobProgressEvent) -> bool:
        # The store is asked only when the answer can change whether it pings.
        return (PING_FIXED in self.on and event.status is Status.COMPLETED
                and self.previous is not None and await self.previous(event.id) is Status.FAILED)

    def due(self, event: JobProgressEvent, fixed: bool) -> bool:
        begun = event.started_at or event.created_at
        ended = event.finished_at or event.updated_at
        long = (ended - begun).total_seconds() >= self.long_s
        return ((PING_FAILED in self.on and event.status is Status.FAILED)
                or (PING_FIXED in self.on and fixed) or (PING_LONG in self.on and long))


class EditScheduler:
    def __init__(
        self,
        sender: Sender,
        messages: MessageBook,
        bucket: TokenBucket,
        interval_s: float,
        max_edits: int = 200,
        pings: Pings = Pings(),
        render: Callable[[JobProgressEvent, float], Rendered] = render_progress,
        load_log: Callable[[str], Awaitable[str]] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        counter: SendCounter | None = None,
    ) -> None:
        self.sender = sender
        self._counter = counter
        self.messages = messages
        self.bucket = bucket
        self.interval_s = interval_s
        self.max_edits = max(max_edits, 1)
        self.pings = pings
        self._render = render
        self._load_log = load_log
        self._clock = clock
        self._monotonic = monotonic
        self._slots: dict[str, Slot] = {}
        self._answers: deque[Reply] = deque()
        self._notices: deque[Reply | Attachment] = deque()
        self._order = itertools.count()
        self._changed = asyncio.Event()
        self._paused_until = 0.0
        self._backoff = 1.0
        self._warned_at = float("-inf")
        self._flushing = False
        self._explained: tuple[str, str] | None = None  # the wait last told at debug level
        self.sent = 0

    # -- what the bot tells us ------------------------------------------------------------

    def track(self, room_id: str, requester: str, reply_to: str,
              event: JobProgressEvent) -> None:
        """Show a new job or batch: its first message answers the command that asked for
        it, and goes out as soon as budget allows (see `_first_due`)."""
        if event.id in self._slots:
            self.update(event)
            return
        now = self._monotonic()
        self._slots[event.id] = Slot(event.id, room_id, requester, reply_to, next(self._order),
                                     event, tracked_at=now,
                                     ended_at=now if event.terminal else float("-inf"))
        self._changed.set()

    def restore(self, message: ProgressMessage, event: JobProgressEvent) -> None:
        """Resume a message from before a restart: edits go on targeting the same event
        (or its first message is sent now, if it never was)."""
        slot = Slot(message.subject_id, message.room_id, message.requester, message.reply_to,
                    next(self._order), event, event_id=message.event_id, edits=message.edits,
                    unsure=message.event_id is None,
                    ended_at=self._monotonic() if event.terminal else float("-inf"))
        self._slots[message.subject_id] = slot
        self._changed.set()

    def update(self, event: JobProgressEvent) -> None:
        slot = self._slots.get(event.id)
        if slot is None or slot.latest.terminal or event.updated_at < slot.latest.updated_at:
            return
        slot.latest = event
        if event.terminal:
            slot.ended_at = self._monotonic()
        self._changed.set()

    def reply(self, room_id: str, reply_to: str, rendered: Rendered,
              mentions: Sequence[str] = ()) -> None:
        """Answer a command (its result, a refusal, an error): it goes before anything else
        but earlier answers, and may spend the final edits' reserve."""
        self._enqueue(self._answers, Reply(room_id, reply_to, rendered, list(mentions),
                                           asked_at=self._monotonic()))

    def notify(self, room_id: str, reply_to: str, rendered: Rendered,
               mentions: Sequence[str] = ()) -> None:
        """Tell something nobody asked for just now (a ping when a job ends): it goes after
        answers and final states, and never from the final edits' reserve."""
        self._enqueue(self._notices, Reply(room_id, reply_to, rendered, list(mentions),
                                           answer=False, asked_at=self._monotonic()))

    def _enqueue(self, queue: deque[Any], reply: Reply) -> None:
        if len(queue) >= MAX_REPLIES:
            log.warning("matrix: %d replies waiting; dropping one to %s", MAX_REPLIES,
                        reply.reply_to)
            return
        queue.append(reply)
        self._changed.set()

    def tracks(self, subject_id: str) -> bool:
        return subject_id in self._slots

    @property
    def backlog(self) -> int:
        """Sends still waiting (answers, first messages, final states, notices, progress)."""
        return (len(self._answers) + len(self._notices)
                + sum(slot.dirty for slot in self._slots.values()))

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            if not await self.send_next():
                await self._wait(self._next_wake(explain=True))

    async def send_next(self) -> bool:
        """Make the most important send that the budget allows now; False if none is due."""
        choice = self._pick()
        if choice is None:
            return False
        await self._send(choice)
        return True

    async def flush(self, timeout_s: float) -> int:
        """At shutdown: send every message's latest state and every reply now, as fast as
        the budget allows, for up to `timeout_s` (call it with `run` stopped). Returns the
        sends left over; the messages among them are brought up to date after the next start."""
        self._flushing = True  # no sends held in reserve
        self.interval_s = 0.0  # and none waiting for its interval
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while True:
                    if await self.send_next():
                        continue
                    wake = self._next_wake(explain=True)
                    if wake is None:
                        break
                    await asyncio.sleep(max(wake, FLUSH_POLL_S))
        return self.backlog

    async def _wait(self, timeout: float | None) -> None:
        self._changed.clear()
        if timeout is not None and timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def _pick(self) -> Slot | Reply | Attachment | None:
        now = self._monotonic()
        if now < self._paused_until or self.bucket.available() < 1:
            return None
        choice: Slot | Reply | Attachment | None = self._next_answer(now)
        if choice is None:
            choice = self._next_final()
        if choice is None and self.bucket.available() >= 1 + self._reserve():
            choice = self._next_notice(now)
        return choice

    def _next_answer(self, now: float) -> Slot | Reply | None:
        """Of the answers due, the one asked for first."""
        firsts = [slot for slot in self._slots.values() if self._first_due(slot, now)]
        first = min(firsts, key=lambda s: (s.tracked_at, s.order), default=None)
        reply = self._answers[0] if self._answers else None
        if first is None or (reply is not None and reply.asked_at < first.tracked_at):
            return reply
        return first

    def _next_final(self) -> Slot | None:
        finals = [slot for slot in self._slots.values()
                  if slot.dirty and slot.latest.terminal and slot.event_id is not None]
        return min(finals, key=lambda s: s.order, default=None)

    def _next_notice(self, now: float) -> Slot | Reply | Attachment | None:
        if self._notices:
            return self._notices[0]
        due = [slot for slot in self._slots.values() if self._progress_due(slot, now)]
        return min(due, key=lambda s: (s.last_sent, s.order), default=None)

    def _reserve(self) -> int:
        """Sends kept back from notices and progress edits, so that every live message's
        final edit can go at once."""
        if self.bucket.unlimited or self._flushing:
            return 0
        return min(len(self._slots), self.bucket.burst - 1)

    def _first_wait(self) -> float:
        return min(self.interval_s, FIRST_MESSAGE_WAIT_S)

    def _first_due(self, slot: Slot, now: float) -> bool:
        """A first message waits one interval, but never over FIRST_MESSAGE_WAIT_S: a job
        quicker than that needs a single event (its final state, sent at once), and a started
        one never shows "queued". The wait stays for a command's explicit first message too:
        it saves a send exactly when the budget is short, and half a second keeps the answer
        well within the second a person waits for a sign of life. It is capped because a
        long interval is chosen to space edits, not to keep people waiting for that sign."""
        return slot.event_id is None and (
            slot.latest.terminal or now - slot.tracked_at >= self._first_wait())

    def _progress_due(self, slot: Slot, now: float) -> bool:
        return (slot.dirty and slot.event_id is not None
                and now - slot.last_sent >= self.interval_s
                and slot.edits < self.max_edits - 1)  # the last edit is the final one's

    def _next_wake(self, explain: bool = False) -> float | None:
        """Seconds until a send may be due (None: nothing waits); with `explain`, say at
        debug level why the most important one waits."""
        waits = self._waits(self._monotonic())
        if explain and log.isEnabledFor(logging.DEBUG):
            self._explain(waits)
        return min((wait.seconds for wait in waits), default=None)

    def _waits(self, now: float) -> list[Wait]:
        """The sends that cannot go now, the most important of each kind."""
        if now < self._paused_until:
            return [Wait(self._paused_until - now, Rank.ANSWER, "every send",
                         "paused after a failed send")]
        waits = []
        answer = self._next_answer(now)
        if answer is not None:
            waits.append(self._for_budget(Rank.ANSWER, answer, 1))
        final = self._next_final()
        if final is not None:
            waits.append(self._for_budget(Rank.FINAL, final, 1))
        held = [slot for slot in self._slots.values()
                if slot.event_id is None and not self._first_due(slot, now)]
        if held:
            slot = min(held, key=lambda s: s.tracked_at)
            waits.append(self._after(slot.tracked_at + self._first_wait() - now,
                                     self._for_budget(Rank.ANSWER, slot, 1),
                                     "a first message waits for its job to move on"))
        need = 1 + self._reserve()
        if self._notices:
            waits.append(self._for_budget(Rank.NOTICE, self._notices[0], need))
        progress = [slot for slot in self._slots.values() if slot.dirty
                    and slot.event_id is not None and slot.edits < self.max_edits - 1]
        if progress:
            slot = min(progress, key=lambda s: (s.last_sent, s.order))
            waits.append(self._after(slot.last_sent + self.interval_s - now,
                                     self._for_budget(Rank.NOTICE, slot, need),
                                     f"edits of a message go {self.interval_s:g}s apart"))
        return waits

    def _for_budget(self, rank: Rank, choice: Slot | Reply | Attachment, need: int) -> Wait:
        """How long `choice` waits for `need` sends in budget, and what holds it back."""
        seconds = self.bucket.seconds_until(need)
        blocked = self.bucket.blocked_for()
        if blocked > 0 and blocked >= seconds - 1e-6:  # (the 429 set the budget too)
            why = f"429: the homeserver asked for {blocked:.1f}s without sends"
        elif need > 1 and self.bucket.tokens() >= 1:
            why = (f"reserve: {self.bucket.tokens():.2f} sends in budget, {need - 1} kept "
                   "for live messages' final edits")
        else:
            why = (f"budget: {self.bucket.tokens():.2f} of {need} sends, refilled at "
                   f"{self.bucket.rate:g}/s")
        return Wait(seconds, rank, describe(choice), why)

    @staticmethod
    def _after(left: float, budget: Wait, reason: str) -> Wait:
        """`budget`, or the interval when that ends later."""
        if left <= budget.seconds:
            return budget
        return Wait(left, budget.rank, budget.what, f"interval: {reason}")

    def _explain(self, waits: list[Wait]) -> None:
        """One debug line each time the most important send waiting, or what holds it,
        changes (not on every wake, so a busy message does not repeat it)."""
        if not waits:
            self._explained = None
            return
        top = min(waits, key=lambda wait: (wait.rank, wait.seconds))
        key = (top.what, top.why.split(":", 1)[0])
        if key != self._explained:
            self._explained = key
            log.debug("matrix: %s waits %.2fs: %s", top.what, top.seconds, top.why)

    # -- sending ------------------------------------------------------------------------------

    async def _send(self, choice: Slot | Reply | Attachment) -> None:
        waited = self._waited(choice)
        self.bucket.take()
        try:
            if isinstance(choice, Reply):
                await self.sender.send(choice.room_id, message_content(
                    choice.rendered, choice.reply_to, choice.mentions), choice.txn_id)
                self._dequeue(choice)
                self._count_sent(edit=False)
            elif isinstance(choice, Attachment):
                await self._send_attachment(choice)
                self._dequeue(choice)
                self._count_sent(edit=False)
            else:
                await self._send_state(choice)
        except RateLimitedError as exc:
            self.bucket.limited(exc.retry_after_s)
            log.debug("matrix: 429 for %s: no sends for %.1fs, then one",
                      describe(choice), exc.retry_after_s)
            if self._counter is not None:
                self._counter.matrix_rate_limited()
            now = self._monotonic()
            if now - self._warned_at >= RATE_WARNING_EVERY_S:
                self._warned_at = now
                log.warning(
                    "the homeserver is rate-limiting the bot (retry in %.1fs); progress edits "
                    "will lag. Exempt the bot: see deploy/README.md (override_ratelimit)",
                    exc.retry_after_s,
                )
            return
        except SendFailedError as exc:
            self._failed(choice, exc)
            return
        except StoreUnavailableError as exc:  # sent, not kept: one line, no traceback
            self._failed(choice, SendFailedError(f"the store could not keep it: {exc}"))
            return
        except Exception as exc:  # e.g. the store failing after a send: retry later
            log.exception("matrix: sending to %s failed", choice.room_id)
            self._failed(choice, SendFailedError(str(exc)))
            return
        self.sent += 1
        self._backoff = 1.0
        if waited is not None:
            log.debug("matrix: sent %s %.2fs after it was %s", *waited)

    def _waited(self, choice: Slot | Reply | Attachment) -> tuple[str, float, str] | None:
        """An answer or a final state about to go, and how long since it was asked for or
        known; None for the rest (and for what waited out a restart)."""
        since, event = float("-inf"), "asked for"
        if isinstance(choice, Reply) and choice.answer:
            since = choice.asked_at
        elif isinstance(choice, Slot) and choice.event_id is None:
            since = choice.tracked_at
        elif isinstance(choice, Slot) and choice.latest.terminal:
            since, event = choice.ended_at, "known"
        if since == float("-inf"):
            return None
        return describe(choice), self._monotonic() - since, event

    def _dequeue(self, choice: Reply | Attachment) -> None:
        queue = self._answers if isinstance(choice, Reply) and choice.answer else self._notices
        if queue and queue[0] is choice:
            queue.popleft()

    def _count_sent(self, edit: bool) -> None:
        if self._counter is None:
            return
        if edit:
            self._counter.matrix_edited()
        else:
            self._counter.matrix_sent()

    async def _send_state(self, slot: Slot) -> None:
        if slot.event_id is None:
            if slot.first is None:
                slot.first = (slot.latest, self._render(slot.latest, self._clock()))
            event, rendered = slot.first
            event_id = await self.sender.send(
                slot.room_id, message_content(rendered, slot.reply_to or None),
                f"mj-{slot.subject_id}-first")
            self._count_sent(edit=False)
            final = event.terminal and not slot.unsure
            await self.messages.save_message(ProgressMessage(
                slot.subject_id, slot.room_id, event_id, slot.requester, slot.reply_to,
                final=final), self._clock())
            # Only once it is kept: until then a retry sends it again under the same
            # transaction id, which the homeserver answers with the same event.
            slot.event_id = event_id
            if slot.unsure:
                return  # what it shows is unknown: the next pass edits in the latest state
        else:
            event = slot.latest
            rendered = self._render(event, self._clock())
            content = edit_content(slot.event_id, rendered)
            digest = hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()
            await self.sender.send(slot.room_id, content,
                                   f"mj-{slot.subject_id}-{slot.edits + 1}-{digest[:12]}")
            self._count_sent(edit=True)
            slot.edits += 1
            await self.messages.update_message(slot.subject_id, slot.edits, event.terminal)
        slot.shown = event
        slot.last_sent = self._monotonic()
        if event.terminal:
            del self._slots[slot.subject_id]
            self._attach_log(slot, event)
            await self._ping(slot, event)

    def _attach_log(self, slot: Slot, event: JobProgressEvent) -> None:
        if (self._load_log is None or event.status is not Status.FAILED
                or event.type != "job" or slot.event_id is None):
            return
        self._notices.append(Attachment(slot.room_id, slot.event_id, slot.subject_id,
                                        log_filename(event), f"mj-{slot.subject_id}-log"))
        self._changed.set()

    async def _send_attachment(self, attachment: Attachment) -> None:
        if attachment.file is None:
            assert self._load_log is not None
            try:
                data = (await self._load_log(attachment.subject_id)).encode()
            except NotFoundError as exc:  # deleted by retention meanwhile
                raise SendFailedError(str(exc), permanent=True) from None
            attachment.file = await self.sender.upload(
                attachment.room_id, data, attachment.filename, LOG_TYPE)
            attachment.size = len(data)
        await self.sender.send(attachment.room_id, file_content(attachment), attachment.txn_id)

    async def _ping(self, slot: Slot, event: JobProgressEvent) -> None:
        if not slot.reply_to:
            return  # a webhook's or schedule's work: no person to ping
        fixed = await self.pings.fixed(event)
        if self.pings.due(event, fixed):
            self.notify(slot.room_id, slot.reply_to,
                        render_final_notice(event, slot.requester, self._clock(), fixed),
                        mentions=[slot.requester])

    def _failed(self, choice: Slot | Reply | Attachment, exc: SendFailedError) -> None:
        where = choice.room_id
        if exc.permanent:
            log.warning("giving up a message in %s: %s", where, exc)
            if isinstance(choice, Reply | Attachment):
                self._dequeue(choice)
            else:
                self._slots.pop(choice.subject_id, None)
            return
        log.warning("sending to %s failed (%s); retrying in %.0fs", where, exc, self._backoff)
        self._paused_until = self._monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)


def describe(choice: Slot | Reply | Attachment) -> str:
    """A send as the debug lines name it: the job or event it is about, never its text."""
    if isinstance(choice, Reply):
        return f"the {'answer' if choice.answer else 'ping'} to {choice.reply_to}"
    if isinstance(choice, Attachment):
        return f"{choice.subject_id}'s log file"
    if choice.event_id is None:
        return f"{choice.subject_id}'s first message"
    return f"{choice.subject_id}'s {'final state' if choice.latest.terminal else 'edit'}"

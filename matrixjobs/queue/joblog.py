"""The whole output of each job: captured per run, masked, capped, followed live.

A job's log is its runs one after the other, each opened by a header line
("── attempt 2 of 3 · 2026-01-01 12:00:00 UTC ──") and closed by how the run
ended. A run's output is kept in whole lines (a line with no end is cut into
pieces of PIECE_CHARS), each line masked on its own so that a secret split
across two reads is still found. Within `max_bytes` a run keeps its head and
its tail, with one line saying what was cut between them; earlier runs fill
what the newest leaves and lose their oldest part first. Memory per running
job is bounded by `max_bytes` plus what its followers have not read yet
(FOLLOW_BUFFER_CHARS characters each).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from matrixjobs.models import Job

# A line longer than this (characters) is kept as several lines.
PIECE_CHARS = 4096
# What of a line with no end yet waits for more output before it is cut: a secret up to
# this long is never split between two pieces.
HOLDBACK_CHARS = 256
# Room for the header, the cut notes and the footer within max_bytes.
NOTES_BYTES = 512
# How far a follower may fall behind before the oldest lines it has not read are dropped.
FOLLOW_BUFFER_CHARS = 1024 * 1024


def header(job: Job, now: float) -> str:
    return f"── attempt {job.retry_count + 1} of {job.max_retries + 1} · {_utc(int(now))} ──"


@functools.lru_cache(maxsize=4)
def _utc(second: int) -> str:
    # Cached: many short runs start within the same second (strftime is a tenth of a run).
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(second))


def cut_note(size: int, lines: int, what: str) -> str:
    return f"── {size} bytes ({lines} lines) {what} cut ──"


class Follower:
    """The lines of one run as they come, for one reader; falls behind by dropping."""

    def __init__(self) -> None:
        self._lines: deque[str] = deque()
        self._bytes = 0
        self._dropped = 0
        self._closed = False
        self._wakeup = asyncio.Event()

    def push(self, line: str) -> None:
        self._lines.append(line)
        self._bytes += len(line)
        while self._bytes > FOLLOW_BUFFER_CHARS:
            self._bytes -= len(self._lines.popleft())
            self._dropped += 1
        self._wakeup.set()

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()

    async def chunks(self) -> AsyncIterator[str]:
        """What arrived since the last chunk, until the run ends."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._dropped:
                yield f"── {self._dropped} lines skipped: the reader fell behind ──\n"
                self._dropped = 0
            if self._lines:
                text = "".join(self._lines)
                self._lines.clear()
                self._bytes = 0
                yield text
            if self._closed:
                return


class RunLog:
    """One run's output as it arrives, with the job's earlier runs before it."""

    __slots__ = ("_cut_bytes", "_cut_lines", "_first_line", "_followers", "_half", "_head",
                 "_head_bytes", "_max_bytes", "_partial", "_redact", "_tail", "_tail_bytes",
                 "changed", "earlier")

    def __init__(self, first_line: Callable[[], str], max_bytes: int,
                 redact: Callable[[str], str]) -> None:
        """`first_line` makes the run's header, once it has output: a silent run (most short
        ones) keeps no log and should not pay for one."""
        self.earlier = ""
        self.changed = False
        self._first_line = first_line
        self._half = (max_bytes - NOTES_BYTES) // 2
        self._max_bytes = max_bytes
        self._redact = redact
        self._partial = ""
        self._head: list[str] = []
        self._head_bytes = 0
        self._tail: deque[str] | None = None  # made when the head is full: most runs never
        self._tail_bytes = 0
        self._cut_bytes = 0
        self._cut_lines = 0
        self._followers: set[Follower] | None = None

    @property
    def empty(self) -> bool:
        return not self._head and not self._partial

    def write(self, text: str) -> None:
        """Add output; only whole lines (or pieces of a very long one) are kept."""
        if self._partial:
            text = self._partial + text
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._add_pieces(line)
        if len(self._partial) >= PIECE_CHARS + HOLDBACK_CHARS:
            # Masked whole before it is cut, and its end waits for the next write: a
            # secret is never split between two pieces (nor between this write and the next).
            partial = self._redact(self._partial)
            whole = (len(partial) - HOLDBACK_CHARS) // PIECE_CHARS * PIECE_CHARS
            self._add_pieces(partial[:whole])
            self._partial = partial[whole:]

    def close(self, footer: str | None) -> None:
        """The run ended: flush the last unfinished line and say how it ended."""
        if self._partial:
            self._add_pieces(self._partial)
            self._partial = ""
        if footer is not None:
            self._add(f"── {footer} ──")
        if self._followers:
            for follower in self._followers:
                follower.close()
            self._followers = None

    def follow(self) -> tuple[str, Follower]:
        """Everything so far and a follower for what comes next, with nothing lost between."""
        follower = Follower()
        if self._followers is None:
            self._followers = set()
        self._followers.add(follower)
        return self.text(), follower

    def unfollow(self, follower: Follower) -> None:
        if self._followers:
            self._followers.discard(follower)

    def text(self) -> str:
        """The job's log as it stands: earlier runs, then this run's head, cut note, tail."""
        parts = list(self._head)
        if self._cut_lines:
            parts.append(cut_note(self._cut_bytes, self._cut_lines, "of this attempt") + "\n")
        parts.extend(self._tail or ())
        own = "".join(parts)
        budget = self._max_bytes - NOTES_BYTES - self._head_bytes - self._tail_bytes
        return _newest(self.earlier, budget) + own

    def _add_pieces(self, line: str) -> None:
        line = self._redact(line)  # whole, before a cut could split a secret
        if len(line) <= PIECE_CHARS:
            self._add(line)
            return
        for start in range(0, len(line), PIECE_CHARS):
            self._add(line[start:start + PIECE_CHARS])

    def _add(self, line: str) -> None:
        if not self._head:
            self._keep(self._first_line() + "\n")
        self._keep(line + "\n")

    def _keep(self, line: str) -> None:
        self.changed = True
        size = len(line) if line.isascii() else len(line.encode("utf-8", "replace"))
        if self._tail is None and self._head_bytes + size <= self._half:
            self._head.append(line)
            self._head_bytes += size
        else:
            if self._tail is None:
                self._tail = deque()
            self._tail.append(line)
            self._tail_bytes += size
            while self._tail_bytes > self._half and len(self._tail) > 1:
                dropped = self._tail.popleft()
                dropped_size = len(dropped.encode("utf-8", "replace"))
                self._tail_bytes -= dropped_size
                self._cut_bytes += dropped_size
                self._cut_lines += 1
        if self._followers:
            for follower in self._followers:
                follower.push(line)


def _newest(text: str, budget: int) -> str:
    """The end of `text` within `budget` bytes, from a line start, saying what was cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= budget:
        return text
    kept = data[len(data) - max(budget, 0):]
    start = kept.find(b"\n") + 1
    kept = kept[start:] if start else b""
    cut = data[:len(data) - len(kept)]
    note = cut_note(len(cut), cut.count(b"\n"), "of earlier attempts")
    return note + "\n" + kept.decode("utf-8", "replace")


def tail(text: str, lines: int, max_bytes: int) -> str:
    """The last `lines` lines of `text`, fewer if they are more than `max_bytes` (UTF-8)."""
    kept = "".join(text.splitlines(keepends=True)[-lines:])
    data = kept.encode()
    if len(data) <= max_bytes:
        return kept
    return data[len(data) - max_bytes:].decode(errors="ignore").partition("\n")[2]


class JobLogs:
    """The logs of the runs going on now, by job id, and who waits for a run to start."""

    def __init__(self, max_bytes: int, redact: Callable[[str], str],
                 clock: Callable[[], float] = time.time) -> None:
        self.max_bytes = max_bytes
        self._redact = redact
        self._clock = clock
        self._live: dict[str, RunLog] = {}
        self._start_waiters: dict[str, list[asyncio.Future[None]]] = {}

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def create(self, job: Job) -> RunLog | None:
        """A log for a run about to start; None when logs are off."""
        if not self.enabled:
            return None
        now = self._clock()
        return RunLog(lambda: header(job, now), self.max_bytes, self._redact)

    def publish(self, job_id: str, log: RunLog) -> None:
        """The run started (its earlier runs' log is in `log.earlier`): others may read it."""
        self._live[job_id] = log
        for waiter in self._start_waiters.pop(job_id, ()):
            if not waiter.done():
                waiter.set_result(None)

    def end(self, job_id: str, footer: str | None) -> str | None:
        """Close a run's log; its whole text if there is anything to save."""
        log = self._live.pop(job_id, None)
        if log is None:
            return None
        if log.empty and footer is None:
            log.close(None)
            return None
        log.close(footer)
        return log.text()

    def live(self, job_id: str) -> RunLog | None:
        return self._live.get(job_id)

    def unsaved(self) -> dict[str, str]:
        """The text of every running log that changed since the last call."""
        found = {}
        for job_id, log in self._live.items():
            if log.changed:
                log.changed = False
                found[job_id] = log.text()
        return found

    def unsave(self, logs: dict[str, str]) -> None:
        """These logs (from `unsaved`) could not be saved: offer them again next time."""
        for job_id in logs:
            log = self._live.get(job_id)
            if log is not None:
                log.changed = True

    async def started(self, job_id: str, timeout_s: float) -> None:
        """Return when a run of `job_id` starts, or after `timeout_s`."""
        waiter = asyncio.get_running_loop().create_future()
        self._start_waiters.setdefault(job_id, []).append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            pass
        finally:
            waiters = self._start_waiters.get(job_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._start_waiters.pop(job_id, None)

"""The built-in `command` handler: run a configured target as a subprocess.

The argv comes from the config with the (already checked) user arguments
appended; nothing goes through a shell. Output (stdout and stderr share one
pipe, so it stays in the order it was written) goes whole to the job's log; it
is also read line by line (CR counts as a line end, for tools that redraw a
progress line) and progress is taken from `::progress CURRENT/TOTAL [message]`,
`::progress PERCENT% [message]` or the target's `progress_regex`.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import re
import signal
from collections import deque
from typing import Any

from matrixjobs.config import SECRET_ENV, TargetConfig
from matrixjobs.errors import (
    BadArgumentsError,
    JobFailedError,
    PermanentJobError,
    UnknownTargetError,
)
from matrixjobs.models import Job
from matrixjobs.progress.reporter import ProgressReporter
from matrixjobs.targets import Targets

TAIL_LINES = 20
LINE_LIMIT = 500
READ_CHUNK = 65536
# After the main process exits, how long its leftover children may keep the pipe open.
DRAIN_S = 2.0
EXIT_POLL_S = 0.1
PROGRESS_LINE = re.compile(
    r"^::progress\s+(?:(?P<percent>\d+(?:\.\d+)?)%|(?P<current>\S+?)\s*/\s*(?P<total>\S+))"
    r"(?:\s+(?P<message>.*))?$"
)


class CommandFailedError(JobFailedError):
    def __init__(self, returncode: int, tail: list[str]) -> None:
        if returncode < 0:
            try:
                reason = f"killed by {signal.Signals(-returncode).name}"
            except ValueError:
                reason = f"killed by signal {-returncode}"
        else:
            reason = f"exit code {returncode}"
        super().__init__("\n".join([reason, *tail]))
        self.returncode = returncode
        self.tail = tail


class OutputParser:
    """Splits output into lines, reports progress lines, keeps the tail of the rest."""

    def __init__(self, progress: ProgressReporter, pattern: re.Pattern[str] | None) -> None:
        self.progress = progress
        self.pattern = pattern
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._partial = ""

    def feed(self, chunk: str) -> None:
        lines = (self._partial + chunk).replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._partial = lines.pop()
        if len(self._partial) > READ_CHUNK:  # a "line" with no end: take it as it is
            lines.append(self._partial)
            self._partial = ""
        for line in lines:
            self.line(line)

    def close(self) -> None:
        if self._partial:
            self.line(self._partial)
            self._partial = ""

    def line(self, line: str) -> None:
        # Only a line's start counts: progress lines are short, and a backtracking
        # progress_regex over a 20 kB line takes seconds, all of it on the event loop.
        line = line[:LINE_LIMIT]
        if not line.strip():
            return
        if line.startswith("::progress") and self._builtin(line):
            return
        if self.pattern is not None and self._custom(line):
            return
        self.tail.append(line)

    def _custom(self, line: str) -> bool:
        match = self.pattern.search(line) if self.pattern is not None else None
        if match is None:
            return False
        groups = match.groupdict()
        current, total = _number(groups.get("current")), _number(groups.get("total"))
        if current is None:
            return False
        self.progress.report(current, total, groups.get("message"))
        return True

    def _builtin(self, line: str) -> bool:
        match = PROGRESS_LINE.match(line.strip())
        if match is None:
            return False
        message = match["message"]
        if match["percent"] is not None:
            self.progress.report(float(match["percent"]), 100.0, message)
            return True
        current, total = _number(match["current"]), _number(match["total"])
        if current is None or total is None:
            return False  # garbage: keep it visible in the output tail instead
        self.progress.report(current, total, message)
        return True


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


class CommandHandler:
    def __init__(self, targets: Targets, kill_grace_s: float = 10.0) -> None:
        self.targets = targets
        self.kill_grace_s = kill_grace_s
        self._groups: set[int] = set()  # process groups of the running targets

    async def run(self, job: Job, progress: ProgressReporter) -> dict[str, Any]:
        name = str(job.data.get("target"))
        try:
            target = self.targets.get(name)
            args = self.targets.check_args(name, list(job.data.get("args") or []))
        except (UnknownTargetError, BadArgumentsError) as exc:
            raise PermanentJobError(str(exc)) from None
        if target.command is None:
            raise PermanentJobError(f"target '{name}' has no command")
        argv = [*target.command, *args]
        if target.cwd is not None and not target.cwd.is_dir():
            raise PermanentJobError(f"working directory not found: {target.cwd}")
        process = await self._spawn(argv, target, job)
        parser = OutputParser(progress, re.compile(target.progress_regex)
                              if target.progress_regex else None)
        self._groups.add(process.pid)
        try:
            returncode = await self._collect(process, parser)
        except BaseException:
            await self._terminate(process)
            raise
        finally:
            self._groups.discard(process.pid)
            _close_pipes(process)
        if returncode != 0:
            raise CommandFailedError(returncode, list(parser.tail))
        return {"exitCode": 0, "output": list(parser.tail)[-5:]}

    def kill_all(self) -> None:
        for pgid in self._groups:
            _signal_group(pgid, signal.SIGKILL)

    async def _spawn(
        self, argv: list[str], target: TargetConfig, job: Job
    ) -> asyncio.subprocess.Process:
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        env.setdefault("PYTHONUNBUFFERED", "1")  # so Python targets' progress lines arrive live
        env.update(target.env)
        env.update(MATRIXJOBS_JOB_ID=job.id, MATRIXJOBS_TARGET=str(job.data.get("target")))
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=target.cwd,
                env=env,
                start_new_session=True,  # its own process group, so cancel reaches children
            )
        except FileNotFoundError:
            raise PermanentJobError(f"executable not found: {argv[0]}") from None
        except PermissionError:
            raise PermanentJobError(f"not allowed to execute: {argv[0]}") from None
        except OSError as exc:
            raise PermanentJobError(f"cannot start {argv[0]}: {exc.strerror or exc}") from None

    async def _collect(self, process: asyncio.subprocess.Process, parser: OutputParser) -> int:
        assert process.stdout is not None
        stdout = process.stdout

        async def read() -> None:
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            while chunk := await stdout.read(READ_CHUNK):
                text = decoder.decode(chunk)
                parser.feed(text)
                parser.progress.log(text)
            text = decoder.decode(b"", final=True)
            parser.feed(text)
            parser.progress.log(text)
            parser.close()

        reader = asyncio.create_task(read())
        try:
            # Process.wait() also waits for the pipe to close, which a background
            # grandchild can hold open forever: watch the exit status instead.
            while process.returncode is None and not reader.done():
                await asyncio.wait({reader}, timeout=EXIT_POLL_S)
            if reader.done():
                return await process.wait()
            done, _ = await asyncio.wait({reader}, timeout=DRAIN_S)
            if not done:
                _signal_group(process.pid, signal.SIGKILL)
                await asyncio.wait({reader}, timeout=DRAIN_S)
        finally:
            if not reader.done():
                reader.cancel()
        parser.close()
        return process.returncode

    async def _terminate(self, process: asyncio.subprocess.Process) -> None:
        """SIGTERM the whole process group, SIGKILL it after the grace period."""
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(_exited(process), self.kill_grace_s)
        except TimeoutError:
            _signal_group(process.pid, signal.SIGKILL)
            await _exited(process)
        except asyncio.CancelledError:
            _signal_group(process.pid, signal.SIGKILL)
            raise
        # Children that ignored SIGTERM outlive the leader; they go too.
        _signal_group(process.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _exited(process: asyncio.subprocess.Process) -> None:
    # Not Process.wait(): it also waits for the pipes to close, which a grandchild that
    # left the process group (setsid) can hold open forever.
    while process.returncode is None:
        await asyncio.sleep(EXIT_POLL_S)


def _close_pipes(process: asyncio.subprocess.Process) -> None:
    """Stop reading a finished target's output, even while an escaped grandchild still
    holds the pipe; asyncio has no public way to close a child's pipes."""
    process._transport.close()  # type: ignore[attr-defined]

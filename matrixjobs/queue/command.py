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
import os
import re
from collections import deque
from pathlib import Path
from typing import Any

from matrixjobs.config import SECRET_ENV, LimitsConfig, TargetProblem
from matrixjobs.errors import (
    BadArgumentsError,
    JobFailedError,
    PermanentJobError,
    UnknownTargetError,
)
from matrixjobs.models import Job
from matrixjobs.progress.reporter import ProgressReporter
from matrixjobs.queue.runner import EXIT_POLL_S, JobProcess, Launch, Runner
from matrixjobs.targets import Targets

TAIL_LINES = 20
LINE_LIMIT = 500
READ_CHUNK = 65536
# After the main process exits, how long its leftover children may keep the pipe open.
DRAIN_S = 2.0
PROGRESS_LINE = re.compile(
    r"^::progress\s+(?:(?P<percent>\d+(?:\.\d+)?)%|(?P<current>\S+?)\s*/\s*(?P<total>\S+))"
    r"(?:\s+(?P<message>.*))?$"
)


class CommandFailedError(JobFailedError):
    def __init__(self, reason: str, returncode: int, tail: list[str]) -> None:
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
    def __init__(self, targets: Targets, limits: LimitsConfig,
                 kill_grace_s: float = 10.0) -> None:
        self.targets = targets
        self.limits = limits  # [queue] limits: every target's defaults
        self.kill_grace_s = kill_grace_s
        # Chosen once at start (queue/containment.py); None until then.
        self.runner: Runner | None = None
        self._running: set[JobProcess] = set()

    async def run(self, job: Job, progress: ProgressReporter) -> dict[str, Any]:
        launch = self._launch(job)
        if self.runner is None:
            raise PermanentJobError("the service has not started")  # a bug, not bad input
        try:
            started = await self.runner.spawn(launch)
        except PermissionError:
            raise PermanentJobError(f"not allowed to execute: {launch.argv[0]}") from None
        except OSError as exc:
            raise PermanentJobError(
                f"cannot start {launch.argv[0]}: {exc.strerror or exc}") from None
        target = self.targets.get(str(job.data.get("target")))
        parser = OutputParser(progress, re.compile(target.progress_regex)
                              if target.progress_regex else None)
        self._running.add(started)
        try:
            returncode = await self._collect(started, parser)
            # Asked before close(), which removes what says whether a limit was hit.
            reason = started.why(returncode, list(parser.tail)) if returncode else None
        except BaseException:
            await started.stop(self.kill_grace_s)
            raise
        finally:
            self._running.discard(started)
            await started.close()
        if reason is not None:
            raise CommandFailedError(reason, returncode, list(parser.tail))
        return {"exitCode": 0, "output": list(parser.tail)[-5:]}

    def _launch(self, job: Job) -> Launch:
        name = str(job.data.get("target"))
        try:
            target = self.targets.get(name)
            args = self.targets.check_args(name, list(job.data.get("args") or []))
        except (UnknownTargetError, BadArgumentsError) as exc:
            raise PermanentJobError(str(exc)) from None
        if target.command is None:
            raise PermanentJobError(f"target '{name}' has no command")
        if target.cwd is not None and not target.cwd.is_dir():
            raise PermanentJobError(f"working directory not found: {target.cwd}")
        try:
            # Found here, as exec would find it: inside a sandbox a missing program
            # would only be the sandbox's exit code.
            program = target.resolve_executable()
        except TargetProblem as exc:
            raise PermanentJobError(str(exc)) from None
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        env.setdefault("PYTHONUNBUFFERED", "1")  # so Python targets' progress lines arrive live
        env.update(target.env)
        env.update(MATRIXJOBS_JOB_ID=job.id, MATRIXJOBS_TARGET=name)
        return Launch(argv=[program, *target.command[1:], *args],
                      cwd=target.cwd or Path.cwd(), env=env, job_id=job.id,
                      limits=target.limits.over(self.limits), network=target.network)

    def kill_all(self) -> None:
        for started in self._running:
            started.kill()

    async def _collect(self, started: JobProcess, parser: OutputParser) -> int:
        process = started.process
        assert process.stdout is not None
        stdout = process.stdout

        async def read() -> None:
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            while chunk := await stdout.read(READ_CHUNK):
                text = decoder.decode(chunk)
                started.output(text)
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
                started.kill()
                await asyncio.wait({reader}, timeout=DRAIN_S)
        finally:
            if not reader.done():
                reader.cancel()
        parser.close()
        return process.returncode

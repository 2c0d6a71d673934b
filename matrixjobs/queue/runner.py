"""How a command target's processes are started, contained, limited and ended.

One seam with two runners, chosen once at start (queue/containment.py) and named by the
start-up log and `doctor`:
- `SandboxRunner` (queue/sandbox.py): bubblewrap gives each job a PID, mount and user
  namespace of its own. The kernel ends every process of the job with it, the service's
  state is hidden from it, and it dies with the service even by SIGKILL.
- `GroupRunner` (here): a process group, as before containment. A process that leaves the
  group (setsid, a daemon) escapes cancel and outlives the service.
`CommandHandler` talks only to a `Runner` and the `JobProcess` it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from matrixjobs.config import LimitsConfig, size_words

EXIT_POLL_S = 0.1
# How programs report an allocation refused (Python, C's strerror, C++, Go, Java, Rust).
MEMORY_REFUSED = re.compile(
    r"MemoryError|Cannot allocate memory|bad_alloc|out of memory|OutOfMemoryError|"
    r"memory allocation of \d+ bytes failed", re.IGNORECASE)
FILE_REFUSED = re.compile(r"File too large|EFBIG")
LIMIT_NAMES = ("memory", "cpu_s", "processes", "file_size", "open_files")
# prlimit(1) options for the limits enforced by rlimits (util-linux).
PRLIMIT_OPTIONS = {"memory": "--as", "cpu_s": "--cpu", "processes": "--nproc",
                   "file_size": "--fsize", "open_files": "--nofile"}


@dataclass(frozen=True, slots=True)
class Launch:
    """One run of a command target, as the runner needs it."""

    argv: list[str]  # the program resolved to a path, then its arguments
    cwd: Path
    env: dict[str, str]
    job_id: str
    limits: LimitsConfig
    network: bool = True


@dataclass(slots=True)
class Enforcement:
    """What contains jobs here, and what enforces each limit (None: nothing can)."""

    mechanism: str
    limits: dict[str, str | None] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what can escape, said loudly

    def problems(self, limits: LimitsConfig, network: bool) -> list[str]:
        """The limits (and network = false) that `limits` asks for and this host cannot keep."""
        asked = limits.model_dump(exclude_none=True)
        found = [f"limits.{name}: {self.limits.get(name) or 'nothing on this host enforces it'}"
                 for name in asked if not self.limits.get(name)]
        if not network and not self.limits.get("network"):
            found.append("network = false needs a network namespace (bubblewrap)")
        return found


def limit_words(name: str, value: int) -> str:
    """The plain reason a job stopped for going over a limit."""
    match name:
        case "memory":
            return f"stopped: over its memory limit of {size_words(value)}"
        case "processes":
            return f"stopped: more than {value} processes"
        case "cpu_s":
            return f"stopped: over its CPU time limit of {value} s"
        case "file_size":
            return f"stopped: wrote a file over its file size limit of {size_words(value)}"
        case _:
            return f"stopped: over its {name} limit of {value}"


def signal_words(number: int) -> str:
    try:
        return f"killed by {signal.Signals(number).name}"
    except ValueError:
        return f"killed by signal {number}"


class JobProcess:
    """A started job: its main process (whose stdout is the job's output) and how to end
    it. This base class is the process-group runner's."""

    def __init__(self, process: asyncio.subprocess.Process, launch: Launch) -> None:
        self.process = process
        self.launch = launch
        # Signals go through a pidfd: once the process is reaped its pid may be reused.
        try:
            self._pidfd: int | None = os.pidfd_open(process.pid)
        except OSError:
            self._pidfd = None  # already gone

    def signal_started(self, sig: signal.Signals) -> None:
        """Signal the process we started, never another that took its pid later."""
        if self._pidfd is not None and self.process.returncode is None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, sig)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self, text: str) -> None:
        """The job's output as it comes (a runner may watch it for a limit's refusals)."""

    def signal_all(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        """SIGKILL every process of the job now."""
        self.signal_all(signal.SIGKILL)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM the job, SIGKILL it after `grace_s`; return once its main process is
        gone. A cancel of this coroutine kills at once."""
        self.signal_all(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.exited(), grace_s)
        except TimeoutError:
            self.kill()
            await self.exited()
        except asyncio.CancelledError:
            self.kill()
            raise
        self.kill()  # children that ignored SIGTERM outlive the leader; they go too

    async def exited(self) -> None:
        # Not Process.wait(): it also waits for the pipes to close, which a grandchild
        # that left the process group can hold open forever.
        while self.process.returncode is None:
            await asyncio.sleep(EXIT_POLL_S)

    def why(self, returncode: int, tail: list[str]) -> str:
        """Why it failed, in words ("exit code 3", "killed by SIGKILL", a limit's reason)."""
        if returncode < 0:
            return self._limit_signal(-returncode) or signal_words(-returncode)
        # Refused by an rlimit rather than killed by a signal: the program (Python ignores
        # SIGXFSZ) says so and exits.
        limits = self.launch.limits
        for name, said in (("memory", MEMORY_REFUSED), ("file_size", FILE_REFUSED)):
            value = getattr(limits, name)
            if value is not None and any(said.search(line) for line in tail[-3:]):
                return limit_words(name, value)
        return f"exit code {returncode}"

    def _limit_signal(self, number: int) -> str | None:
        limits = self.launch.limits
        if number == signal.SIGXCPU and limits.cpu_s is not None:
            return limit_words("cpu_s", limits.cpu_s)
        if number == signal.SIGXFSZ and limits.file_size is not None:
            return limit_words("file_size", limits.file_size)
        return None

    async def close(self) -> None:
        """After the run: stop reading its output (an escaped grandchild may still hold
        the pipe; asyncio has no public way to close a child's pipes)."""
        self.process._transport.close()  # type: ignore[attr-defined]
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class Runner(Protocol):
    enforcement: Enforcement

    async def spawn(self, launch: Launch) -> JobProcess: ...


def rlimit_argv(limits: LimitsConfig, enforcement: Enforcement) -> list[str]:
    """`prlimit --as=… -- ` for the limits this runner enforces with rlimits."""
    options = [f"{PRLIMIT_OPTIONS[name]}={value}"
               + (f":{value + 1}" if name == "cpu_s" else "")  # SIGXCPU first, SIGKILL 1 s on
               for name, value in limits.model_dump(exclude_none=True).items()
               if (enforcement.limits.get(name) or "").startswith("RLIMIT")]
    if not options:
        return []
    return [PRLIMIT, *options, "--"]


PRLIMIT = shutil.which("prlimit") or "/usr/bin/prlimit"


class GroupRunner:
    """Process groups only: what was there before containment."""

    def __init__(self, reason: str) -> None:
        per_process = "per process, not per job"
        self.enforcement = Enforcement(
            mechanism=f"process groups only ({reason})",
            limits={"memory": f"RLIMIT_AS ({per_process})",
                    "cpu_s": f"RLIMIT_CPU ({per_process})",
                    "processes": None,
                    "file_size": "RLIMIT_FSIZE",
                    "open_files": f"RLIMIT_NOFILE ({per_process})"},
            warnings=[
                "jobs are NOT contained: a process that leaves its job's process group "
                "(setsid, a daemon) survives cancel and timeouts, every job process "
                "outlives a SIGKILL of the service, and jobs can read the service's store, "
                "keys and .env. Install bubblewrap (Debian: apt-get install bubblewrap) "
                "with user namespaces enabled"])
        if not shutil.which("prlimit"):
            for name in LIMIT_NAMES:
                self.enforcement.limits[name] = None

    async def spawn(self, launch: Launch) -> JobProcess:
        argv = [*rlimit_argv(launch.limits, self.enforcement), *launch.argv]
        return JobProcess(await start_process(argv, launch), launch)


async def start_process(argv: list[str], launch: Launch) -> asyncio.subprocess.Process:
    """A job's first process: stdout and stderr on one pipe (in the order written), no
    stdin, a session and process group of its own (so a group signal reaches children)."""
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=launch.cwd,
        env=launch.env,
        start_new_session=True,
    )

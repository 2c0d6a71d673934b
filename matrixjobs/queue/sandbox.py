"""Each job in a bubblewrap sandbox: PID, mount and user namespaces of its own.

What the kernel then guarantees (docs/guarantees.md):
- the job's init is bubblewrap's; when the job's main process ends, or the init is killed,
  the kernel kills every process left in the PID namespace (setsid, double forks and
  SIGTERM-ignoring children included);
- `--die-with-parent`: bubblewrap and the job get SIGKILL when the service dies, even by
  SIGKILL, so a restarted service never runs a second copy beside the first;
- a fresh /proc shows only the job's processes (not the service's environ), the service's
  state directory is an empty tmpfs and its secret files read as empty, /tmp is a private
  tmpfs, and no capability is kept;
- `network = false` adds a network namespace with only its own loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from matrixjobs.config import Config, LimitsConfig, PrivatePaths, UnixAddress
from matrixjobs.errors import PermanentJobError
from matrixjobs.queue.cgroups import Cgroups, JobCgroup, detect
from matrixjobs.queue.runner import (
    EXIT_POLL_S,
    Enforcement,
    JobProcess,
    Launch,
    limit_words,
    rlimit_argv,
    signal_words,
    start_process,
)

log = logging.getLogger(__name__)

BWRAP = "bwrap"
PROBE_TIMEOUT_S = 10.0
# How often a job under a per-job process limit is counted (the limit itself is the kernel's).
COUNT_POLL_S = 0.25
# A refused fork said in the output counts when the job is this close to its limit (its
# processes come and go faster than they are counted).
FORK_SLACK = 8
# How long a finished job's cgroup may take to empty before we stop trying to remove it.
CGROUP_EMPTY_S = 2.0
TMP = Path("/tmp")
# How shells and runtimes report a fork refused (dash, bash, Python, libc's strerror).
FORK_REFUSED = re.compile(r"Cannot fork|fork: (retry: )?Resource temporarily unavailable|"
                          r"can't start new thread|BlockingIOError: \[Errno 11\]")
# A sandboxed command killed by signal N makes bubblewrap exit 128 + N.
SIGNAL_EXIT = 128


def base_argv(bwrap: str, network: bool) -> list[str]:
    # /sys read-only: a job runs as the service's user, who owns its delegated cgroups
    # (and as root, sysfs); it must not raise its own limits or move itself out.
    # No user namespaces inside: in one of its own a job would hold every capability and
    # could mount cgroupfs anew and raise its own limits (found in review).
    argv = [bwrap, "--dev-bind", "/", "/", "--ro-bind", "/sys", "/sys", "--unshare-user",
            "--disable-userns", "--unshare-pid", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--proc", "/proc"]
    if not network:
        argv.append("--unshare-net")
    return argv


def probe(bwrap: str, network: bool) -> str | None:
    """None if a sandbox starts here, else bubblewrap's own words why not."""
    try:
        result = subprocess.run([*base_argv(bwrap, network), "--", "/bin/true"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, timeout=PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc) or type(exc).__name__
    if result.returncode == 0:
        return None
    words = result.stderr.decode(errors="replace").strip().splitlines()
    return words[-1] if words else f"exit code {result.returncode}"


def job_tasks(pid: int) -> list[int]:
    """Every process below `pid` (its children, theirs, …), from /proc."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            threads = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in threads:
            with contextlib.suppress(OSError), open(
                    f"/proc/{parent}/task/{tid}/children", encoding="ascii") as f:
                children = [int(child) for child in f.read().split()]
                found += children
                todo += children
    return found


# Clean-ups that need not hold up a job's end, kept here until done (a task nobody
# references may be collected before it runs).
_cleanups: set[asyncio.Task[None]] = set()


def _later(work: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(work)
    _cleanups.add(task)
    task.add_done_callback(_cleanups.discard)


def _ptrace_open() -> bool:
    """Whether a process may ptrace any other of its user (no Yama, or ptrace_scope 0)."""
    try:
        return Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip() == "0"
    except OSError:
        return True


def _is(path: Path, kind: Callable[[int], bool]) -> bool:
    """Whether `path` is there and of this kind; a path this user cannot even look at (a
    file in another user's home) is none of a job's business either."""
    try:
        return kind(path.stat().st_mode)
    except OSError:
        return False


def _holds(directory: Path, path: Path) -> bool:
    return directory == path or directory in path.parents


def thread_count(pids: list[int]) -> int:
    count = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            count += len(os.listdir(f"/proc/{pid}/task"))
    return count


class SandboxProcess(JobProcess):
    """The process we start is bubblewrap; below it its init (PID 1 of the job's
    namespace), and below that the command (PID 2) and everything it starts."""

    def __init__(self, process: asyncio.subprocess.Process, launch: Launch,
                 cgroup: JobCgroup | None, count_limit: int | None) -> None:
        super().__init__(process, launch)
        self.breach: str | None = None
        self.cgroup = cgroup
        self._count_limit = count_limit  # processes held by RLIMIT_NPROC, not a cgroup
        self._watch = (asyncio.create_task(self._watch_limits(), name=f"limits-{launch.job_id}")
                       if cgroup is not None or count_limit is not None else None)

    def _init(self) -> list[int]:
        """bubblewrap's child, the job's init; none once bubblewrap was reaped (its pid,
        and so its children's list, may belong to another process by then)."""
        if self.process.returncode is not None:
            return []
        with contextlib.suppress(OSError), open(
                f"/proc/{self.process.pid}/task/{self.process.pid}/children",
                encoding="ascii") as f:
            return [int(pid) for pid in f.read().split()]
        return []

    def signal_all(self, sig: signal.Signals) -> None:
        if sig == signal.SIGKILL:
            self.kill()
            return
        # bubblewrap's own processes are left alone: their death would SIGKILL the job
        # at once, and the job gets its grace first.
        for pid in [p for init in self._init() for p in job_tasks(init)]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def kill(self) -> None:
        # The init's death makes the kernel kill the whole namespace; bubblewrap's takes
        # the init with it (--die-with-parent) should the init not have been forked yet.
        if self.cgroup is not None:
            self.cgroup.kill()
        for pid in self._init():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.signal_started(signal.SIGKILL)

    def why(self, returncode: int, tail: list[str]) -> str:
        self._check_cgroup()
        if self.breach is not None:
            return self.breach
        if returncode == 1 and tail and tail[0].startswith("bwrap: "):
            return f"the sandbox could not start: {tail[0].removeprefix('bwrap: ')}"
        if SIGNAL_EXIT < returncode <= SIGNAL_EXIT + 64:
            number = returncode - SIGNAL_EXIT
            return self._limit_signal(number) or signal_words(number)
        return super().why(returncode, tail)

    def output(self, text: str) -> None:
        # Words alone prove nothing (a job may print them): only a job near its limit.
        if (self._count_limit is not None and FORK_REFUSED.search(text)
                and self._tasks() >= self._count_limit - FORK_SLACK):
            self._breached("processes")

    def _tasks(self) -> int:
        return thread_count([p for init in self._init() for p in job_tasks(init)])

    def _breached(self, limit: str) -> None:
        if self.breach is None:
            value = getattr(self.launch.limits, limit)
            self.breach = limit_words(limit, value)
            self.kill()

    def _check_cgroup(self) -> None:
        if self.cgroup is not None and (limit := self.cgroup.hit()) is not None:
            self._breached(limit)

    async def _watch_limits(self) -> None:
        """A limit the kernel enforced ends the whole job at once: the OOM killer takes one
        process (the job would go on without it), and a fork bomb refused new processes
        tries again for ever. Under RLIMIT_NPROC what the job says about a refused fork may
        not reach its output, so a job seen sitting at its limit is ended too."""
        at_limit_since: float | None = None
        while self.process.returncode is None and self.breach is None:
            self._check_cgroup()
            if self._count_limit is not None:
                if self._tasks() < self._count_limit:
                    at_limit_since = None
                elif at_limit_since is None:
                    at_limit_since = time.monotonic()
                elif time.monotonic() - at_limit_since >= 2 * COUNT_POLL_S:
                    self._breached("processes")
            await asyncio.sleep(COUNT_POLL_S)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await super().close()
        if self.cgroup is not None:
            self.kill()  # nothing may be left to keep the cgroup busy
            if not self.cgroup.remove():  # its last processes are still on their way out
                _later(self._remove(self.cgroup))

    @staticmethod
    async def _remove(cgroup: JobCgroup) -> None:
        deadline = time.monotonic() + CGROUP_EMPTY_S
        while not cgroup.remove() and time.monotonic() < deadline:
            await asyncio.sleep(EXIT_POLL_S)


class SandboxRunner:
    def __init__(self, bwrap: str, network: bool, private: PrivatePaths,
                 cgroups: Cgroups | None, api_socket: Path | None = None) -> None:
        self.bwrap = bwrap
        # A unix socket is a file, not the network: a network namespace does not hide it.
        self.api_socket = api_socket
        self.state = private.state.resolve()
        self.private_dirs = [p.resolve() for p in private.dirs]
        self.private_files = [p.resolve() for p in private.files]
        self.cgroups = cgroups
        self.root = os.geteuid() == 0
        per_process = "per process, not per job"
        controllers = cgroups.controllers if cgroups is not None else set()
        where = cgroups.describe() if cgroups is not None else ""
        memory = (f"memory controller of {where} (whole job)" if "memory" in controllers
                  else f"RLIMIT_AS ({per_process})")
        processes = (f"pids controller of {where} (whole job)" if "pids" in controllers
                     # Root is exempt from RLIMIT_NPROC whatever namespace it is in.
                     else None if self.root
                     else "RLIMIT_NPROC in the job's own user namespace (whole job)")
        self.enforcement = Enforcement(
            mechanism="bubblewrap: a PID, mount and user namespace per job "
                      "(the kernel ends the whole job; it dies with the service)",
            limits={"memory": memory,
                    "cpu_s": f"RLIMIT_CPU ({per_process})",
                    "processes": processes,
                    "file_size": "RLIMIT_FSIZE",
                    "open_files": f"RLIMIT_NOFILE ({per_process})",
                    "network": "a network namespace with only its own loopback"
                    if network else None})
        if _ptrace_open():
            self.enforcement.warnings.append(
                "kernel.yama.ptrace_scope is 0 or Yama is off: a job can ptrace its "
                "sandbox's init and so outlive a SIGKILL of the service"
                + (" (the start-up sweep of job cgroups still ends it before its job runs "
                   "again)" if cgroups is not None else "")
                + "; set kernel.yama.ptrace_scope = 1 (the shipped unit's SystemCallFilter "
                "also refuses ptrace)")
        if not shutil.which("prlimit"):
            for name, how in self.enforcement.limits.items():
                if how is not None and how.startswith("RLIMIT"):
                    self.enforcement.limits[name] = None

    def argv(self, launch: Launch) -> list[str]:
        argv = base_argv(self.bwrap, launch.network)
        argv += ["--tmpfs", str(TMP)]
        # A private /tmp, but what the job runs from stays where it was.
        for path in (launch.cwd, launch.cwd.resolve(), Path(launch.argv[0]).resolve()):
            if path == TMP:  # a job that works in /tmp itself shares the host's
                argv += ["--bind", str(TMP), str(TMP)]
            elif TMP in path.parents:
                keep = TMP / path.relative_to(TMP).parts[0]
                argv += ["--bind", str(keep), str(keep)]
        argv += self._hide(launch.cwd.resolve())
        if not launch.network:
            # Unix sockets are files, not the network: those of local services (databases,
            # this API) live under /run.
            argv += ["--tmpfs", "/run"]
            if self.api_socket is not None and _is(self.api_socket, stat.S_ISSOCK):
                argv += ["--ro-bind", "/dev/null", str(self.api_socket)]
        argv += ["--chdir", str(launch.cwd), "--"]
        limits = rlimit_argv(self._rlimits(launch), self.enforcement)
        return [*argv, *limits, *launch.argv]

    @staticmethod
    def _rlimits(launch: Launch) -> LimitsConfig:
        limits = launch.limits
        if limits.processes is not None:
            # bubblewrap's init lives in the job's user namespace too and counts.
            limits = limits.model_copy(update={"processes": limits.processes + 1})
        return limits

    def _hide(self, cwd: Path) -> list[str]:
        ops: list[str] = []
        hidden = [d for d in self.private_dirs if _is(d, stat.S_ISDIR) and not _holds(d, cwd)]
        if self.state_hidden_whole(cwd):
            hidden.insert(0, self.state)
        for directory in hidden:
            ops += ["--tmpfs", str(directory)]
        for file in self.private_files:
            if _is(file, stat.S_ISREG) and not any(d in file.parents for d in hidden):
                ops += ["--ro-bind", "/dev/null", str(file)]
        return ops

    def state_hidden_whole(self, cwd: Path) -> bool:
        """The store's directory is hidden whole unless the job runs inside it or it holds
        more than the service's own files (a home directory, /var/lib): then the secret
        files in it are masked one by one."""
        if not _is(self.state, stat.S_ISDIR) or _holds(self.state, cwd):
            return False
        ours = {*self.private_dirs, *self.private_files}
        try:
            return all(entry.resolve() in ours for entry in self.state.iterdir())
        except OSError:
            return False

    def _cgroup(self, launch: Launch) -> JobCgroup | None:
        """Every job gets one where cgroups can be made, limits or not: what the kernel's
        parent-death signal misses (a job can undo it by ptracing its init where Yama
        allows), the start-up sweep still ends through it."""
        if self.cgroups is None:
            return None
        try:
            return self.cgroups.create(launch.job_id, launch.limits)
        except OSError as exc:
            raise PermanentJobError(f"cannot make the job's cgroup, so its limits would not "
                                    f"hold: {exc.strerror or exc}") from None

    async def spawn(self, launch: Launch) -> JobProcess:
        cgroup = self._cgroup(launch)
        try:
            argv = self.argv(launch)
            process = await start_process(cgroup.joining(argv) if cgroup else argv, launch)
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            raise
        held = "pids" in (self.cgroups.controllers if self.cgroups else set())
        count = launch.limits.processes if not (self.root or held) else None
        return SandboxProcess(process, launch, cgroup, count)


def sandbox_runner(config: Config,
                   enable_cgroups: bool = True) -> tuple[SandboxRunner | None, str]:
    """A sandbox runner if bubblewrap works here; else None and why not."""
    bwrap = shutil.which(BWRAP)
    if bwrap is None:
        return None, "bubblewrap (bwrap) is not installed"
    problem = probe(bwrap, network=True)
    if problem is not None:
        return None, f"bubblewrap cannot start a sandbox here: {problem}"
    network = probe(bwrap, network=False) is None
    cgroups = detect(enable=enable_cgroups)
    if cgroups is not None and enable_cgroups:
        cgroups.sweep()
    address = config.api.address
    socket = address.path if config.api.enabled and isinstance(address, UnixAddress) else None
    return SandboxRunner(bwrap, network, config.private_paths(), cgroups, socket), ""

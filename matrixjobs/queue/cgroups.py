"""A cgroup per job, where this service may make them: the job's memory and process
limits for the whole job, and the kernel's word when it hit one.

- cgroup v2 (what systemd hosts run): our own cgroup must be delegated to us (the unit's
  `Delegate=`). Children with controllers need a parent without processes, so the service
  first moves itself into a leaf `service/`, then enables `memory` and `pids` for
  `job-…` siblings. `memory.max`, `pids.max`, `cgroup.kill`; `memory.events` (oom_kill)
  and `pids.events` (max) say that a limit was hit.
- cgroup v1 (older hosts, and containers like the test machines): one directory per job
  in the `memory` and `pids` hierarchies under ours, where we may write (root).
  `memory.limit_in_bytes`, `pids.max`; `memory.oom_control` (oom_kill), `pids.events`.
A job joins its cgroups before bubblewrap runs (a shell writes "0" into each cgroup.procs,
then execs it), so nothing it starts is ever outside them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from matrixjobs.config import LimitsConfig

ROOT = Path("/sys/fs/cgroup")
V2_CANDIDATES = (ROOT, ROOT / "unified")  # unified, or the hybrid layout's v2 mount
PREFIX = "matrixjobs-"
LEAF = "service"
CONTROLLERS = ("memory", "pids")
LIMIT_OF = {"memory": "memory", "pids": "processes"}
# Moves the shell into each cgroup given before "--", then execs the rest.
JOIN = ('while [ "$1" != -- ]; do echo 0 > "$1" || exit 125; shift; done; shift; '
        'exec "$@"')
# How long the start-up sweep waits for a dead service's job cgroup to empty.
SWEEP_WAIT_S = 2.0


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii")
    except OSError:
        return None


def _write(path: Path, value: str) -> bool:
    try:
        path.write_text(value, encoding="ascii")
    except OSError:
        return False
    return True


def own_cgroups(text: str | None = None) -> dict[str, str]:
    """/proc/self/cgroup as {controller or "" for v2: path}."""
    found: dict[str, str] = {}
    for line in (text if text is not None else _read(Path("/proc/self/cgroup")) or "").splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            found[controller.removeprefix("name=")] = path
    return found


def _counter(text: str | None, key: str) -> int:
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


@dataclass(slots=True)
class JobCgroup:
    """One job's cgroup directories (one on v2; one per controller on v1)."""

    version: int
    dirs: dict[str, Path]  # controller ("" on v2) → directory

    @property
    def procs(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in dict.fromkeys(self.dirs.values())]

    def joining(self, argv: list[str]) -> list[str]:
        """`argv` run by a shell that first moves itself into the cgroup ("0" means the
        writer) and then execs it: nothing the job starts is ever outside. A shell rather
        than a preexec function, which would cost Python's fast spawn path (vfork)."""
        return ["/bin/sh", "-c", JOIN, "join", *self.procs, "--", *argv]

    def hit(self) -> str | None:
        """Which limit the kernel enforced on the job, if any: "memory" or "processes"."""
        if "memory" in self.dirs:
            events = "memory.events" if self.version == 2 else "memory.oom_control"
            if _counter(_read(self.dirs["memory"] / events), "oom_kill"):
                return "memory"
        if "pids" in self.dirs and _counter(_read(self.dirs["pids"] / "pids.events"), "max"):
            return "processes"
        return None

    def kill(self) -> None:
        if self.version == 2:
            _write(self.dirs[""] / "cgroup.kill", "1")

    def remove(self) -> bool:
        """rmdir each directory (only empty cgroups go); False if one stays."""
        removed = True
        for directory in dict.fromkeys(self.dirs.values()):
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                removed = False
        return removed


class Cgroups:
    """Where this process makes its jobs' cgroups, and which limits they can hold."""

    def __init__(self, version: int, bases: dict[str, Path], controllers: set[str]) -> None:
        self.version = version
        self.bases = bases  # controller ("" on v2) → our cgroup's directory
        self.controllers = controllers  # of memory and pids, those our job cgroups have

    def describe(self) -> str:
        places = ", ".join(sorted({str(b) for b in self.bases.values()}))
        return f"cgroup v{self.version} ({places})"

    def create(self, job_id: str, limits: LimitsConfig) -> JobCgroup:
        """The job's cgroup with its limits; OSError if it cannot be made (the job must
        then not run: its limits would not hold)."""
        # The pid names the service for the sweep; the rest only needs to be new (a job's
        # earlier cgroup may still be on its way out, and a process may run several Apps).
        name = f"{PREFIX}{os.getpid()}-{job_id}-{secrets.token_hex(4)}"
        if self.version == 2:
            dirs = {"": self.bases[""] / name}
            dirs.update({c: dirs[""] for c in self.controllers})
        else:
            # One hierarchy is enough to find (and end) the job's processes: the memory
            # one only where memory is limited (making a memory cgroup costs the most).
            wanted = [c for c in sorted(self.controllers)
                      if c == "pids" or getattr(limits, LIMIT_OF[c]) is not None]
            dirs = {c: self.bases[c] / name for c in wanted or sorted(self.controllers)[:1]}
        cgroup = JobCgroup(self.version, dirs)
        try:
            for directory in dict.fromkeys(dirs.values()):
                directory.mkdir()
            self._limit(cgroup, limits)
        except OSError:
            cgroup.remove()
            raise
        return cgroup

    def _limit(self, cgroup: JobCgroup, limits: LimitsConfig) -> None:
        dirs = cgroup.dirs
        if limits.memory is not None and "memory" in dirs:
            if self.version == 2:
                (dirs["memory"] / "memory.max").write_text(str(limits.memory))
                _write(dirs["memory"] / "memory.swap.max", "0")  # a limit, not a swap storm
            else:
                (dirs["memory"] / "memory.limit_in_bytes").write_text(str(limits.memory))
                _write(dirs["memory"] / "memory.memsw.limit_in_bytes", str(limits.memory))
        if limits.processes is not None and "pids" in dirs:
            (dirs["pids"] / "pids.max").write_text(str(limits.processes))

    def sweep(self) -> None:
        """End what is left in the job cgroups of our processes that died (a job that kept
        running past a SIGKILL of the service), then remove them: at start, before any
        job is recovered, so a recovered job never runs beside its old copy."""
        for base in set(self.bases.values()):
            for directory in base.glob(f"{PREFIX}*"):
                pid = directory.name.removeprefix(PREFIX).split("-", 1)[0]
                if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    self._end(JobCgroup(self.version, {"": directory, "pids": directory}))

    @staticmethod
    def _end(cgroup: JobCgroup) -> None:
        deadline = time.monotonic() + SWEEP_WAIT_S
        while not cgroup.remove() and time.monotonic() < deadline:
            cgroup.kill()
            if cgroup.version == 1:  # no cgroup.kill: each process it holds
                for directory in dict.fromkeys(cgroup.dirs.values()):
                    for pid in (_read(directory / "cgroup.procs") or "").split():
                        with contextlib.suppress(OSError, ValueError):
                            os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.01)


def detect(proc_cgroup: str | None = None, enable: bool = True) -> Cgroups | None:
    """The cgroups this process may make jobs' cgroups in, with memory and pids if it can.
    `enable`: on cgroup v2, enable them for our children (moving this process into a leaf
    first); without it (doctor), only say what could be enabled."""
    own = own_cgroups(proc_cgroup)
    v2 = _v2(own.get(""), enable)
    if v2 is not None and v2.controllers >= set(CONTROLLERS):
        return v2
    v1 = _v1(own)
    if v1 is not None and len(v1.controllers) > len(v2.controllers if v2 else ()):
        return v1
    return v2


def _v2(path: str | None, enable: bool) -> Cgroups | None:
    if path is None:
        return None
    for mount in V2_CANDIDATES:
        base = mount / path.lstrip("/")
        if (mount / "cgroup.controllers").is_file() and os.access(base, os.W_OK):
            offered = set((_read(base / "cgroup.controllers") or "").split())
            controllers = (_enable(base, offered, root=path == "/") if enable
                           else offered & set(CONTROLLERS))
            return Cgroups(2, {"": base}, controllers)
    return None


def _enable(base: Path, offered: set[str], root: bool) -> set[str]:
    """Enable memory and pids for our children; return those now enabled."""
    wanted = [c for c in CONTROLLERS if c in offered]
    if not wanted:
        return set()
    enabled = set((_read(base / "cgroup.subtree_control") or "").split())
    if not set(wanted) <= enabled:
        # The root cgroup may hold processes and have children with controllers; any other
        # may not, so the service moves itself into a leaf first (Delegate= allows it).
        if not root and _read(base / "cgroup.procs"):
            leaf = base / LEAF
            with contextlib.suppress(FileExistsError, OSError):
                leaf.mkdir()
            if not _write(leaf / "cgroup.procs", str(os.getpid())):
                return enabled & set(CONTROLLERS)
        _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))
        enabled = set((_read(base / "cgroup.subtree_control") or "").split())
    return enabled & set(CONTROLLERS)


def _v1(own: dict[str, str]) -> Cgroups | None:
    bases: dict[str, Path] = {}
    for controller in CONTROLLERS:
        if controller not in own:
            continue
        base = ROOT / controller / own[controller].lstrip("/")
        if base.is_dir() and os.access(base, os.W_OK):
            bases[controller] = base
    return Cgroups(1, bases, set(bases)) if bases else None

"""Choosing the runner once at start, and refusing limits this host cannot keep."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
from pathlib import Path

from matrixjobs.config import Config, LimitsConfig
from matrixjobs.errors import ConfigError
from matrixjobs.queue.runner import GroupRunner, Runner
from matrixjobs.queue.sandbox import SandboxRunner, sandbox_runner

log = logging.getLogger(__name__)

RLIMITS = {"memory": resource.RLIMIT_AS, "cpu_s": resource.RLIMIT_CPU,
           "processes": resource.RLIMIT_NPROC, "file_size": resource.RLIMIT_FSIZE,
           "open_files": resource.RLIMIT_NOFILE}


def choose_runner(config: Config, enable_cgroups: bool = True) -> Runner:
    """bubblewrap where it works (or where `containment = "bubblewrap"` demands it), else
    process groups; ConfigError if a target asks for a limit the runner cannot keep.
    `enable_cgroups` False (doctor): look, but change no cgroup."""
    runner = pick_runner(config, enable_cgroups)
    problems = unenforceable(config, runner)
    if problems:
        raise ConfigError("limits this host cannot enforce "
                          f"({runner.enforcement.mechanism}):\n  " + "\n  ".join(problems))
    return runner


def pick_runner(config: Config, enable_cgroups: bool = True) -> Runner:
    """Blocking (it runs bubblewrap to see that it works): call it off the event loop."""
    if config.queue.containment == "none":
        return GroupRunner('[queue] containment = "none"')
    sandbox, why_not = sandbox_runner(config, enable_cgroups)
    if sandbox is None and config.queue.containment == "bubblewrap":
        raise ConfigError(f'queue.containment = "bubblewrap": {why_not}')
    return sandbox or GroupRunner(why_not)


def unenforceable(config: Config, runner: Runner) -> list[str]:
    """Each target's limits (over [queue] limits) that nothing here enforces, or that are
    beyond what this service may give."""
    found = [f"queue.{problem}"
             for problem in _problems(runner, config.queue.limits, network=True)]
    for name, target in sorted(config.targets.items()):
        if target.command is None:
            continue
        own = target.limits.over(config.queue.limits)
        found += [f"targets.{name}.{problem}"
                  for problem in _problems(runner, own, target.network)
                  if f"queue.{problem}" not in found]
    return found


def _problems(runner: Runner, limits: LimitsConfig, network: bool) -> list[str]:
    return [*runner.enforcement.problems(limits, network), *_beyond_own(runner, limits)]


def _beyond_own(runner: Runner, limits: LimitsConfig) -> list[str]:
    """A process may not give its children more than its own hard limit (root may, up to
    the kernel's ceiling): such a limit would fail every job at its start."""
    found = []
    for name, value in limits.model_dump(exclude_none=True).items():
        how = runner.enforcement.limits.get(name) or ""
        if not how.startswith("RLIMIT"):
            continue
        # processes: the job's own user namespace counts; bubblewrap's init is one more.
        wanted = value + 1 if name == "processes" else value
        ceiling = _ceiling(RLIMITS[name])
        if ceiling is not None and wanted > ceiling:
            found.append(f"limits.{name}: {value} is more than this service may give "
                         f"({ceiling}, its own hard limit)")
    return found


def _ceiling(resource_id: int) -> int | None:
    _, hard = resource.getrlimit(resource_id)
    if os.geteuid() == 0:
        if resource_id != resource.RLIMIT_NOFILE:
            return None
        with contextlib.suppress(OSError, ValueError):
            return int(Path("/proc/sys/fs/nr_open").read_text())
        return None
    return None if hard == resource.RLIM_INFINITY else hard


def describe(runner: Runner) -> list[tuple[str, str]]:
    """What the start-up log and doctor say, per limit: what enforces it here."""
    return [(f"limits.{name}" if name != "network" else "network = false",
             how or "cannot be enforced here")
            for name, how in runner.enforcement.limits.items()]


def shared_state(config: Config, runner: Runner) -> list[str]:
    """Why the store's directory is not hidden whole from some targets' jobs (only the
    store's and the keys' files in it are): said at start and by doctor."""
    if not isinstance(runner, SandboxRunner):
        return []  # nothing is hidden at all, and that is said louder elsewhere
    state = runner.state
    found = []
    for name, target in sorted(config.targets.items()):
        cwd = (target.cwd or Path.cwd()).resolve()
        inside = cwd == state or state in cwd.parents
        if target.command is None or runner.state_hidden_whole(cwd):
            continue
        if not inside and not state.exists():
            continue  # not made yet (doctor before the first start): made holding ours only
        why = (f"runs in {cwd}, inside the store's directory" if inside
               else f"runs beside {state}, which holds more than the store")
        found.append(f"targets.{name} {why}: its jobs see the files there but the store's "
                     "and the keys'; give the store a directory of its own ([store] path)")
    return found

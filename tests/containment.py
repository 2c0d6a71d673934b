"""Finding a job's processes from outside, and running things as `nobody`, for the
containment tests (`from containment import …`)."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOBODY = "nobody"


def needs_bwrap() -> None:
    """Containment is the feature under test: without bubblewrap its tests fail, never
    skip (`bash .ci/run` installs it)."""
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")


def new_marker() -> str:
    """A number no other process has in its command line: `sleep 3600.<digits>`."""
    return f"3600.{secrets.randbelow(10**9):09d}"


def marked(marker: str) -> list[int]:
    """Live processes with `marker` in their command line (zombies have none)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry))
    return found


def running_python(marker: str) -> list[int]:
    """The Python processes with `marker` (not the sandboxes around them)."""
    found = []
    for pid in marked(marker):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(sys.executable.encode()):
                found.append(pid)
    return found


def wait_marked(marker: str, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(found := marked(marker)) >= count:
            return found
        time.sleep(0.02)
    raise AssertionError(f"{len(marked(marker))} processes with {marker}, wanted {count}")


def gone_within(marker: str, timeout: float) -> float:
    """Seconds until no process has `marker`; AssertionError (naming them) past `timeout`."""
    started = time.monotonic()
    while marked(marker):
        if time.monotonic() - started > timeout:
            left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120]
                    for pid in marked(marker)}
            raise AssertionError(f"still running after {timeout} s: {left}")
        time.sleep(0.01)
    return time.monotonic() - started


def kill_marked(marker: str) -> None:
    """Teardown: whatever a failed test left running goes."""
    for pid in marked(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def escaping_script(marker: str, exit_code: int | None = None) -> str:
    """A shell script whose children try every way out of a process group: a setsid
    grandchild, a double-forked daemon, a child that ignores SIGTERM. It then works
    (sleeps) or, with `exit_code`, exits at once leaving them behind."""
    end = f"exit {exit_code}" if exit_code is not None else f"sleep {marker}"
    return (f"setsid sleep {marker} & "
            f"( sh -c 'sleep {marker}' & ) & "
            f"sh -c 'trap \"\" TERM; sleep {marker}' & "
            f"echo started; {end}")


# -- as an unprivileged user ----------------------------------------------------------------


def nobody_uid() -> int:
    return pwd.getpwnam(NOBODY).pw_uid


def nobody_dir() -> Iterator[Path]:
    """A directory `nobody` owns, under /tmp (pytest's own are root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="matrixjobs-nobody-"))
    os.chmod(path, 0o755)
    os.chown(path, nobody_uid(), -1)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_nobody(argv: list[str]) -> list[str]:
    # setpriv execs in place (runuser forks and waits): a SIGKILL sent to the pid we
    # started reaches the program itself. Changing the uid from 0 drops every capability.
    return ["setpriv", f"--reuid={NOBODY}", "--regid=nogroup", "--clear-groups", "--", *argv]


def nobody_python() -> tuple[list[str], dict[str, str]]:
    """How `nobody` can run this checkout's matrixjobs: this interpreter if it may, else
    Debian's of the same version with this venv's packages on its path; skips if neither."""
    if os.geteuid() != 0:
        pytest.skip("switching to nobody needs root")
    paths = [str(REPO), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for python in (sys.executable, f"/usr/bin/{version}"):
        # Also what the service will check before it runs a target with this interpreter:
        # setpriv's own exec may still pass a directory that nobody cannot search.
        check = "import matrixjobs.app, os, sys; sys.exit(not os.access(sys.executable, 1))"
        probe = subprocess.run(as_nobody([python, "-c", check]),
                               env={**os.environ, **env}, capture_output=True, timeout=60)
        if probe.returncode == 0:
            return [python], env
    pytest.skip(f"nobody can run neither {sys.executable} nor /usr/bin/{version} with "
                "this checkout's packages (a directory on the way is private)")

"""Look at the service's SQLite store without changing it: safe while the service runs.

The running service holds an advisory lock on `<db>.lock`; the probe never takes it,
never creates or migrates the database, and reads it through a read-only connection.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from matrixjobs.matrix.settings import SETTING_TOKEN, SETTING_USER
from matrixjobs.store.sqlite import MIGRATIONS

SCHEMA_VERSION = len(MIGRATIONS)
# The byte of a WAL store's -shm file that its writer locks (SQLite's wal.c).
WAL_WRITE_LOCK = 120


class StoreProblem(Exception):
    """The store would not work; the message says why."""


@dataclass(frozen=True, slots=True)
class StoreState:
    exists: bool
    schema_version: int | None = None
    saved_user: str | None = None
    saved_token: str | None = None
    holder_pid: int | None = None  # the process holding the service's lock
    writer_pid: int | None = None  # a process holding SQLite's write lock now


def probe(path: Path) -> StoreState:
    _check_directory(path.parent)
    holder = _lock_holder(path)
    try:
        exists, is_file = path.exists(), path.is_file()
    except OSError as exc:
        raise StoreProblem(f"cannot look into {path.parent}: {exc.strerror or exc}") from None
    if not exists:
        return StoreState(exists=False, holder_pid=holder)
    if not is_file:
        raise StoreProblem(f"{path} is not a file")
    if not os.access(path, os.R_OK | os.W_OK):
        raise StoreProblem(f"{path} is not readable and writable by this user")
    try:
        with contextlib.closing(connect_read_only(path)) as db:
            damage = quick_check(db)
            if damage != ["ok"]:
                raise StoreProblem(f"{path} is damaged (SQLite's quick_check: "
                                   f"{first_problems(damage)}); restore it from a backup")
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            settings: dict[str, str] = {}
            if version >= 1:
                settings = dict(db.execute(
                    "SELECT key, value FROM settings WHERE key IN (?, ?)",
                    (SETTING_USER, SETTING_TOKEN)).fetchall())
    except sqlite3.DatabaseError as exc:
        raise StoreProblem(f"cannot read {path}: {exc}") from None
    if version > SCHEMA_VERSION:
        raise StoreProblem(f"{path}: schema version {version} is newer than this matrixjobs "
                           f"understands ({SCHEMA_VERSION}); upgrade matrixjobs")
    return StoreState(True, version, settings.get(SETTING_USER),
                      settings.get(SETTING_TOKEN) or None, holder, write_lock_holder(path))


def quick_check(db: sqlite3.Connection) -> list[str]:
    """SQLite's quick_check: ["ok"], or the problems it found (it may stop on the worst)."""
    found: list[str] = []
    try:
        for (row,) in db.execute("PRAGMA quick_check"):
            found.append(row)
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            raise  # not damaged: not a store at all
        found.append(str(exc))
    return found


def first_problems(rows: list[str], count: int = 2) -> str:
    """The first problems an integrity or quick check names, one line for a person."""
    lines = [line for row in rows for line in row.splitlines() if not line.startswith("***")]
    more = f" (and {len(lines) - count} more)" if len(lines) > count else ""
    return "; ".join(lines[:count]) + more


def _check_directory(directory: Path) -> None:
    """The service creates the directory if needed, then files in it (db, WAL, lock)."""
    existing = directory
    try:
        while not existing.exists():
            existing = existing.parent
    except OSError as exc:  # a directory on the way that this user may not search
        raise StoreProblem(f"cannot look into {existing.parent}: {exc.strerror or exc}") from None
    if not existing.is_dir():
        raise StoreProblem(f"{existing} is not a directory")
    try:
        # A real write tells the truth where permission bits do not (root, read-only
        # mounts, ACLs); an unnamed temp file leaves nothing behind.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise StoreProblem(f"cannot write in {existing}: {exc.strerror or exc}") from None


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that can neither change the store nor take the service's lock."""
    # A read-only connection to a WAL database creates -wal/-shm files it cannot remove.
    # They exist while a service has the store open; when they do not, nobody is writing
    # and the file can be read as immutable, without them.
    wal = path.with_name(path.name + "-wal")
    options = "mode=ro" if wal.exists() else "mode=ro&immutable=1"
    return sqlite3.connect(f"file:{quote(str(path.resolve()))}?{options}", uri=True,
                           timeout=5.0)


def _lock_holder(path: Path) -> int | None:
    """The pid holding the service's lock on `<db>.lock`, found without touching the lock."""
    lock = path.with_name(path.name + ".lock")
    try:
        inode = lock.stat().st_ino
    except OSError:
        return None
    try:
        table = Path("/proc/locks").read_text(encoding="ascii")
    except OSError:
        return _pid_in_lock_file(lock)  # no /proc (not Linux): trust the pid it names
    # "3: FLOCK  ADVISORY  WRITE 27162 fe:00:2163475 0 EOF": kind, ..., pid, dev:inode
    for fields in (row.split() for row in table.splitlines()):
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].endswith(f":{inode}"):
            with contextlib.suppress(ValueError):
                return int(fields[4])
    return None


def write_lock_holder(path: Path) -> int | None:
    """The pid holding SQLite's write lock on a WAL store (a POSIX lock on byte 120 of its
    -shm file: WAL_WRITE_LOCK), read from /proc/locks without touching the lock."""
    try:
        inode = path.with_name(path.name + "-shm").stat().st_ino
        table = Path("/proc/locks").read_text(encoding="ascii")
    except OSError:
        return None
    # "1: POSIX  ADVISORY  WRITE 2144 fe:00:15343737 120 120"
    for fields in (row.split() for row in table.splitlines()):
        if (len(fields) >= 8 and fields[1] == "POSIX" and fields[3] == "WRITE"
                and fields[5].endswith(f":{inode}") and fields[6] == str(WAL_WRITE_LOCK)):
            with contextlib.suppress(ValueError):
                return int(fields[4])
    return None


def _pid_in_lock_file(lock: Path) -> int | None:
    try:
        pid = int(lock.read_text(encoding="ascii").strip())
        os.kill(pid, 0)
    except PermissionError:
        return pid  # alive, under another user
    except (OSError, ValueError):
        return None
    return pid

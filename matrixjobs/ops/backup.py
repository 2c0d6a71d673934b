"""`matrixjobs backup`: a consistent copy of the live SQLite store, taken with SQLite's
online backup API while the service runs, private (0600) and checked before it is named;
for a PostgreSQL store, the `pg_dump` command that does the same."""

from __future__ import annotations

import contextlib
import os
import shlex
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from matrixjobs.config import Config
from matrixjobs.ops.store_probe import StoreProblem, connect_read_only, first_problems


@dataclass(frozen=True, slots=True)
class BackupSummary:
    jobs: int
    batches: int
    logs: int
    size: int  # bytes of the copy


def backup_sqlite(db: Path, to: Path) -> BackupSummary:
    """Copy `db` to `to` (which must not exist); StoreProblem says why not."""
    if to.exists():
        raise StoreProblem(f"{to} exists: remove it or name another file")
    if not db.is_file():
        raise StoreProblem(f"{db}: there is no store to back up")
    # Written beside the target under another name and renamed once checked: a backup
    # cut short never looks like one.
    partial = to.with_name(f".{to.name}.partial")
    try:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise StoreProblem(f"cannot write {to}: {exc.strerror or exc}") from None
    try:
        with contextlib.closing(connect_read_only(db)) as source, \
                contextlib.closing(sqlite3.connect(partial)) as copy:
            # One step: a single read transaction, so the copy is one moment of the store
            # (in WAL mode the service's writes go on meanwhile).
            source.backup(copy)
            problems = [row[0] for row in copy.execute("PRAGMA integrity_check")]
            if problems != ["ok"]:
                raise StoreProblem(f"the copy fails SQLite's integrity check: "
                                   f"{first_problems(problems)}")
            counts = [copy.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                      for table in ("jobs", "batches", "job_logs")]
        os.replace(partial, to)
    except sqlite3.Error as exc:
        raise StoreProblem(f"cannot back up {db}: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return BackupSummary(*counts, size=to.stat().st_size)


def pg_dump_command(config: Config, to: Path) -> str:
    """The pg_dump command for the configured PostgreSQL store, without its password."""
    url = config.store.database_url
    assert url is not None  # load_config refuses a PostgreSQL store without one
    parts = urlsplit(url.get_secret_value())
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    user = f"{parts.username}@" if parts.username else ""
    port = f":{parts.port}" if parts.port else ""
    bare = urlunsplit((parts.scheme, f"{user}{host}{port}", parts.path, parts.query, ""))
    return f"pg_dump --format=custom --file {shlex.quote(str(to))} {shlex.quote(bare)}"


def describe(summary: BackupSummary) -> str:
    return (f"{summary.jobs} jobs, {summary.batches} batches, {summary.logs} logs, "
            f"{summary.size / 1024**2:.1f} MiB")

"""`matrixjobs migrate-store`: move a deployment's SQLite store into PostgreSQL.

The service must be stopped: the copy holds the SQLite store's lock, so the service
cannot start meanwhile; the target must hold no matrixjobs data. Jobs the stopped service
left `processing` are copied with their lease ended: the first node to start recovers
them as after a crash (requeued, or failed when out of retries).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from matrixjobs.config import Config, database_url_problem
from matrixjobs.errors import StoreError
from matrixjobs.models import Status
from matrixjobs.ops.store_probe import StoreProblem, probe
from matrixjobs.store.copier import Copied, copy_store
from matrixjobs.store.pg_conn import describe_url
from matrixjobs.store.postgres import PostgresStore
from matrixjobs.store.sqlite import SqliteStore


class MigrateRefused(Exception):
    """Nothing was copied; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Migration:
    source: Path
    target: str  # host:port/database, never the password
    copied: Copied
    interrupted: int  # jobs the stopped service left running


def target_url(to: str | None, config: Config) -> str:
    url = to or (config.store.database_url.get_secret_value()
                 if config.store.database_url else None)
    if not url:
        raise MigrateRefused("name the PostgreSQL database: --to postgresql://… or "
                             "MATRIXJOBS_DATABASE_URL")
    if problem := database_url_problem(url):
        raise MigrateRefused(f"--to: {problem}")  # never echo the URL: it may hold a password
    return url


def migrate(config: Config, url: str) -> Migration:
    if config.store.backend != "sqlite":
        raise MigrateRefused('the config already says store.backend = "postgresql": '
                             "migrate-store reads the SQLite store the config names")
    path = config.store.path
    _refuse_unusable(path)
    return asyncio.run(_copy(path, config.store.synchronous, url))


def _refuse_unusable(path: Path) -> None:
    try:
        state = probe(path)
    except StoreProblem as exc:
        raise MigrateRefused(str(exc)) from None
    if not state.exists:
        raise MigrateRefused(f"no SQLite store at {path}: nothing to migrate")
    if state.holder_pid is not None:
        raise MigrateRefused(f"the service (pid {state.holder_pid}) has {path} open: stop it "
                             "first (systemctl stop matrixjobs)")


async def _copy(path: Path, synchronous: str, url: str) -> Migration:
    source, target = SqliteStore(path, synchronous), PostgresStore(url)
    try:
        await source.open()
        await target.open()
        copied = await copy_store(source, target)
        # Copied as is, owner and all: the next start settles them (module doc).
        interrupted = (await target.count_jobs()).get(Status.PROCESSING, 0)
    except StoreError as exc:
        raise MigrateRefused(str(exc)) from None
    finally:
        await target.close()
        await source.close()
    return Migration(path, describe_url(url), copied, interrupted)


def report(migration: Migration, config: Config, out: TextIO) -> None:
    print(f"copied {migration.source} into PostgreSQL at {migration.target}:", file=out)
    for table, count in migration.copied.counts.items():
        print(f"  {table:<18} {count}", file=out)
    after = ", ".join(f"{table} after {last}" for table, last in migration.copied.last_ids.items())
    print(f"  new ids continue: {after}", file=out)
    if migration.interrupted:
        print(f"{migration.interrupted} job(s) were left running by the stopped service: its "
              "next start recovers them as after a crash (requeued, or failed when out of "
              "retries)", file=out)
    print(_next_steps(migration, config), file=out)


def _next_steps(migration: Migration, config: Config) -> str:
    host_db = migration.target
    steps = [
        "The config file was not changed. To run on PostgreSQL, set in its [store] section:",
        '  backend = "postgresql"',
        f'  url = "postgresql://USER@{host_db}"   (without the password), or put the whole',
        "  URL, password included, in MATRIXJOBS_DATABASE_URL in the service's .env",
        f"Keep [store] path = {config.store.path} as it is.",
    ]
    if config.matrix is not None:
        crypto = config.matrix.crypto_store_dir(config.store.path)
        key = config.matrix.pickle_key_file(config.store.path)
        steps.append(f"The bot's crypto store ({crypto}) and pickle key ({key}) stay on disk "
                     "and must stay reachable there (or set [matrix] store_dir): without them "
                     "the bot cannot read encrypted rooms with its saved device.")
    steps.append(f"Keep {migration.source} as the backup until the service runs on PostgreSQL.")
    return "\n".join(steps)

"""The embedded store: one SQLite file in WAL mode, through aiosqlite.

One service owns a database file at a time (an advisory lock on `<db>.lock`),
which is what lets `recover_interrupted` treat every job another owner left in
`processing` as interrupted without waiting for its lease to run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import aiosqlite

from matrixjobs import audit as audit_log
from matrixjobs.audit import AuditQuery, Entry, Record
from matrixjobs.errors import (
    AlreadySubmittedError,
    SlotHeldError,
    StoreError,
    TokenExistsError,
)
from matrixjobs.models import (
    HELD_UNTIL,
    INTERRUPTED_BY_STOP,
    Approval,
    Batch,
    Job,
    JobSpec,
    Outcome,
    PersonalToken,
    Progress,
    ProgressMessage,
    ScheduleState,
    Status,
    Trigger,
    Worker,
    batch_id,
    job_id,
    parse_id,
)
from matrixjobs.private import make_dirs, private_file, tighten
from matrixjobs.store.base import BatchCancel, Cycle, Heartbeat, Recovery, Store, heartbeat_of
from matrixjobs.store.rows import (
    AWAITING_APPROVAL,
    BATCH_COLUMNS,
    ERRORS_PER_BATCH,
    JOB_COLUMNS,
    QUALIFIED_JOB_COLUMNS,
    RUNNING_BY_OWNER,
    SCHEDULE_COLUMNS,
    SCHEDULE_DONE,
    SCHEDULE_OF_SLOT,
    SCHEDULE_PAUSE,
    SCHEDULE_REBASE,
    SCHEDULE_RESUME,
    WORKER_COLUMNS,
    approval_table,
    approval_text,
    approvals_of,
    batch_from_row,
    checked_number,
    dumps,
    first_line,
    held,
    job_from_row,
    number_of,
    recount,
    schedule_from_row,
    schedule_slot,
    slot_held,
    token_exists,
    trigger_text,
    with_running,
    worker_from_row,
    worker_values,
)

# Each entry migrates from version N to N+1; PRAGMA user_version records N+1.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE batches (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        total INTEGER NOT NULL,
        completed INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        cancelled INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    );
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        type TEXT NOT NULL,
        name TEXT NOT NULL,
        data TEXT NOT NULL,
        status TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        retry_count INTEGER NOT NULL DEFAULT 0,
        max_retries INTEGER NOT NULL,
        timeout_s REAL NOT NULL,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        batch_id INTEGER REFERENCES batches(id) ON DELETE CASCADE,
        run_after REAL NOT NULL DEFAULT 0,
        owner TEXT,
        lease_expires_at REAL,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        progress_current REAL,
        progress_total REAL,
        progress_message TEXT,
        error TEXT,
        result TEXT
    );
    CREATE INDEX jobs_pending ON jobs(priority DESC, id) WHERE status = 'pending';
    CREATE INDEX jobs_processing ON jobs(owner) WHERE status = 'processing';
    CREATE INDEX jobs_batch ON jobs(batch_id) WHERE batch_id IS NOT NULL;
    CREATE INDEX jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL;
    CREATE INDEX batches_finished ON batches(finished_at) WHERE finished_at IS NOT NULL;
    -- job/batch id -> the Matrix message that shows its progress (edits target event_id)
    CREATE TABLE progress_messages (
        subject_id TEXT PRIMARY KEY,
        room_id TEXT NOT NULL,
        event_id TEXT,  -- NULL until the first message is sent
        requester TEXT NOT NULL,
        reply_to TEXT NOT NULL,
        edits INTEGER NOT NULL DEFAULT 0,
        final INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );
    CREATE INDEX progress_messages_open ON progress_messages(final) WHERE final = 0;
    -- small durable settings of the interfaces (e.g. the bot's device id and token)
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    -- command events already acted on, so a replayed event never starts a second job
    CREATE TABLE processed_events (
        event_id TEXT PRIMARY KEY,
        subject_id TEXT,
        processed_at REAL NOT NULL
    );
    CREATE INDEX processed_events_at ON processed_events(processed_at);
    """,
    # who asked for each job and batch (a Matrix user id, "api", "cli", "mcp", …)
    """
    ALTER TABLE jobs ADD COLUMN requester TEXT;
    ALTER TABLE batches ADD COLUMN requester TEXT;
    """,
    # each job's whole output (docs/logs.md), deleted with the job
    """
    CREATE TABLE job_logs (
        job_id INTEGER PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE,
        text TEXT NOT NULL
    );
    """,
    # routing (a target's runs_on labels, JSON), which worker ran a job, and the workers
    """
    ALTER TABLE jobs ADD COLUMN runs_on TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE jobs ADD COLUMN worker TEXT;
    ALTER TABLE jobs ADD COLUMN claimed_ahead INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE workers (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        role TEXT NOT NULL,
        labels TEXT NOT NULL,
        slots INTEGER NOT NULL,
        version TEXT NOT NULL,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL
    );
    """,
    # approvals a job or batch waits for (JSON, models.Approval); its jobs are held
    # (run_after = HELD_UNTIL) until it is granted
    """
    ALTER TABLE jobs ADD COLUMN approval TEXT;
    ALTER TABLE batches ADD COLUMN approval TEXT;
    """,
    # the audit log (matrixjobs/audit.py): append-only, a hash chain; audit_head holds its
    # last record's seq and hash, so a cut-off end is found too
    f"""
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        action TEXT NOT NULL,
        actor TEXT NOT NULL,
        via TEXT NOT NULL,
        subject TEXT,
        target TEXT,
        room_id TEXT,
        event_id TEXT,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX audit_at ON audit(at);
    CREATE TABLE audit_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL,
        hash TEXT NOT NULL
    );
    INSERT INTO audit_head VALUES (1, 0, '{audit_log.GENESIS}');
    -- the head follows each record inside SQLite: one statement an action, not two
    CREATE TRIGGER audit_head_follows AFTER INSERT ON audit BEGIN
        UPDATE audit_head SET seq = NEW.seq, hash = NEW.hash WHERE id = 1;
    END;
    """,
    # personal API tokens: only a SHA-256 of each (the token is shown once, when issued)
    """
    CREATE TABLE tokens (
        digest TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        name TEXT NOT NULL,
        created_at REAL NOT NULL,
        UNIQUE (user_id, name)
    );
    """,
    # what started work no person asked for (JSON, models.Trigger), and a job's concurrency
    # group: a claim takes a grouped job only while no job of its group runs
    """
    ALTER TABLE jobs ADD COLUMN trigger_info TEXT;
    ALTER TABLE batches ADD COLUMN trigger_info TEXT;
    ALTER TABLE jobs ADD COLUMN concurrency TEXT;
    CREATE INDEX jobs_concurrency ON jobs(concurrency, status, priority DESC, id)
        WHERE concurrency IS NOT NULL;
    """,
    # schedules: what every node shares of each (its slots fire once through
    # processed_events; this keeps the last one dealt with, its job, and a pause)
    """
    CREATE TABLE schedules (
        name TEXT PRIMARY KEY,
        last_slot REAL,
        last_job TEXT,
        paused_by TEXT,
        paused_at REAL
    );
    """,
    # the audit chain's head without a row rewritten by each record: its hash is the last
    # record's, its number the highest SQLite ever gave the table (AUTOINCREMENT keeps it
    # in sqlite_sequence, which a submit writes anyway for the job's id), so a cut-off end
    # still shows; the trigger's extra page per record was most of the audit's cost
    f"""
    CREATE TABLE audit_numbered (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        action TEXT NOT NULL,
        actor TEXT NOT NULL,
        via TEXT NOT NULL,
        subject TEXT,
        target TEXT,
        room_id TEXT,
        event_id TEXT,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    INSERT INTO audit_numbered ({audit_log.COLUMNS})
        SELECT {audit_log.COLUMNS} FROM audit ORDER BY seq;
    DROP TABLE audit;
    ALTER TABLE audit_numbered RENAME TO audit;
    CREATE INDEX audit_at ON audit(at);
    INSERT INTO sqlite_sequence (name, seq)
        SELECT 'audit', 0 WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'audit');
    UPDATE sqlite_sequence SET seq = max(seq, (SELECT seq FROM audit_head))
        WHERE name = 'audit';
    DROP TABLE audit_head;
    """,
    # no index on the audit's time: `at` never decreases along the chain (`_audit`), so a
    # time is found by bisecting seq (FIRST_SINCE); the index's page cost every record
    # about a third of what the audit costs a submit (bench/audit_overhead.py)
    """
    DROP INDEX audit_at;
    """,
    # waiting jobs ordered within their group, ungrouped ones (NULL) together first: the
    # claim's ungrouped arm seeks to them instead of stepping over every waiting grouped
    # job (a busy group's backlog, read at every claim: 223 vs 65 µs a claim with 1,000
    # waiting behind a running one)
    """
    DROP INDEX jobs_pending;
    CREATE INDEX jobs_pending ON jobs(concurrency, priority DESC, id) WHERE status = 'pending';
    """,
    # what a schedule's last slot was read from: a cron or zone changed since is a
    # schedule new from its next slot, not one whose "missed" slot runs at start
    """
    ALTER TABLE schedules ADD COLUMN cron TEXT;
    ALTER TABLE schedules ADD COLUMN timezone TEXT;
    """,
]

# The audit chain's head (seq, hash): the highest number the chain reached, which deleting
# records does not lower, and the hash of its last record.
INSERT_AUDIT = f"INSERT INTO audit ({audit_log.COLUMNS}) VALUES ({', '.join('?' * 12)})"
AUDIT_HEAD = ("SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'audit'), 0), "
              "coalesce((SELECT hash FROM audit ORDER BY seq DESC LIMIT 1), "
              f"'{audit_log.GENESIS}'), "
              "coalesce((SELECT at FROM audit ORDER BY seq DESC LIMIT 1), 0)")
# The seq of the first record at or after a time (one past the last if there is none), by
# bisection: `at` never decreases along the chain. Each step probes the record at or after
# its midpoint (retention leaves the chain's start missing), twice: SQLite lets a recursive
# step name the recursive table once, outside any subquery.
PROBE = "(SELECT at FROM audit WHERE seq >= (lo + hi) / 2 ORDER BY seq LIMIT 1) >= ?"
FIRST_SINCE = (
    "WITH RECURSIVE step(lo, hi) AS ("
    "SELECT coalesce(min(seq), 1), coalesce(max(seq), 0) + 1 FROM audit UNION ALL "
    f"SELECT CASE WHEN {PROBE} THEN lo ELSE (lo + hi) / 2 + 1 END, "
    f"CASE WHEN {PROBE} THEN (lo + hi) / 2 ELSE hi END FROM step WHERE lo < hi) "
    "SELECT lo FROM step WHERE lo = hi")

log = logging.getLogger(__name__)

MIN_SQLITE = (3, 35, 0)
BUSY_TIMEOUT_MS = 5000
# At start, how long one try for the write lock waits (so the wait is said at once).
LOCK_POLL_MS = 250
# While waiting for it, how often a debug line says the wait goes on.
LOCK_NOTE_S = 5.0
DEFAULT_LOCK_WAIT_S = 30.0
CANCELLED_BATCH = "coalesce(batch_id IN (SELECT id FROM batches WHERE cancel_requested = 1), 0)"
# Due jobs this worker can run ({table}: how the statement names the jobs table).
CLAIMABLE = (
    "{table}.status = 'pending' AND {table}.run_after <= ? "
    f"AND NOT {CANCELLED_BATCH} AND ({{table}}.runs_on = '[]' OR NOT EXISTS (SELECT 1 FROM "
    "json_each({table}.runs_on) AS need WHERE need.value NOT IN (SELECT value FROM "
    "json_each(?))))"
)
# The groups with pending jobs, one index seek each (a skip-scan: a group's backlog is
# stepped over, not read).
PENDING_GROUPS = (
    "WITH RECURSIVE pending_group(name) AS (SELECT (SELECT concurrency FROM jobs WHERE "
    "concurrency IS NOT NULL AND status = 'pending' ORDER BY concurrency LIMIT 1) UNION ALL "
    "SELECT (SELECT concurrency FROM jobs WHERE concurrency > pending_group.name AND "
    "status = 'pending' ORDER BY concurrency LIMIT 1) FROM pending_group "
    "WHERE pending_group.name IS NOT NULL) "
)
# The claim: due jobs in no concurrency group, and of each group with no job running its
# first due job (by priority, then age), the best `limit` of them; each arm stops at
# `limit` itself, so a long queue is never sorted whole, and a busy group's backlog costs
# a claim two index seeks.
CLAIM = (
    f"{PENDING_GROUPS}"
    "UPDATE jobs SET status = 'processing', owner = ?, lease_expires_at = ?, "
    "worker = ?, claimed_ahead = picked.ahead, started_at = CASE WHEN picked.ahead "
    "THEN jobs.started_at ELSE COALESCE(jobs.started_at, ?) END "
    "FROM (SELECT id, row_number() OVER (ORDER BY priority DESC, id) > ? AS ahead FROM ("
    "SELECT * FROM (SELECT id, priority FROM jobs WHERE concurrency IS NULL AND "
    f"{CLAIMABLE.format(table='jobs')} ORDER BY priority DESC, id LIMIT ?) UNION ALL "
    "SELECT * FROM (SELECT grouped.id, grouped.priority FROM pending_group, jobs AS grouped "
    "WHERE pending_group.name IS NOT NULL AND NOT EXISTS (SELECT 1 FROM jobs AS busy WHERE "
    "busy.concurrency = pending_group.name AND busy.status = 'processing') AND grouped.id = "
    "(SELECT first.id FROM jobs AS first WHERE first.concurrency = pending_group.name AND "
    f"first.status = 'pending' AND first.run_after <= ? AND NOT {CANCELLED_BATCH} "
    "ORDER BY first.priority DESC, first.id LIMIT 1) AND "
    f"{CLAIMABLE.format(table='grouped')} ORDER BY grouped.priority DESC, grouped.id "
    "LIMIT ?)) ORDER BY priority DESC, id LIMIT ?) AS picked "
    f"WHERE jobs.id = picked.id RETURNING {QUALIFIED_JOB_COLUMNS}"
)
# Rows per multi-row statement: well under SQLite's 32766 bound variables.
ROWS_PER_STATEMENT = 500


class SqliteStore(Store):
    def __init__(self, path: Path, synchronous: str = "full",
                 lock_wait_s: float = DEFAULT_LOCK_WAIT_S) -> None:
        self.path = Path(path)
        self.synchronous = synchronous
        self.lock_wait_s = lock_wait_s
        self._db: aiosqlite.Connection | None = None
        self._lock_file: IO[str] | None = None
        self._lock = asyncio.Lock()
        self._unfinished = False
        # The audit chain's last record (seq, hash, at) as committed, and as this
        # transaction leaves it.
        self._audit_head: tuple[int, str, float] | None = None
        self._pending_head: tuple[int, str, float] | None = None
        self._unwritten: list[Record] = []  # this transaction's, written with its COMMIT

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise StoreError(
                f"SQLite {sqlite3.sqlite_version} is too old: matrixjobs needs "
                f"{'.'.join(map(str, MIN_SQLITE))} or newer (for RETURNING and UPDATE … FROM)"
            )
        try:
            make_dirs(self.path.parent)
        except OSError as exc:
            raise StoreError(f"cannot create store directory {self.path.parent}: {exc}") from None
        self._hold_file_lock()
        try:
            self._make_private()
            self._db = await aiosqlite.connect(self.path, isolation_level=None, timeout=5.0)
            await self._wait_writable()
            await self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = await self._scalar("PRAGMA journal_mode = WAL")
            if mode != "wal":
                raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode})")
            await self._db.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            await self._db.execute("PRAGMA foreign_keys = ON")
            await self._migrate()
        except sqlite3.DatabaseError as exc:
            await self.close()
            raise StoreError(f"cannot open store {self.path}: {_explain(exc)}") from None
        except StoreError:
            await self.close()
            raise

    async def _wait_writable(self) -> None:
        """Another process may hold the store's write lock (a `sqlite3` shell in a
        transaction, a backup tool): wait up to `lock_wait_s`, saying so once, then give up
        in one line. Without this the first write at start failed after the busy timeout."""
        began = noted = time.monotonic()
        deadline = began + self.lock_wait_s
        waiting = False
        await self.db.execute(f"PRAGMA busy_timeout = {LOCK_POLL_MS}")
        while True:
            try:
                await self.db.execute("BEGIN IMMEDIATE")
                await self.db.execute("ROLLBACK")
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
            else:
                if waiting:
                    log.info("store %s is free again (waited %.1f s)", self.path,
                             time.monotonic() - began)
                return
            if time.monotonic() >= deadline:
                raise StoreError(f"store {self.path} is locked by another process (waited "
                                 f"{self.lock_wait_s:g} s; [store] lock_wait_s)")
            if not waiting:
                log.warning("store %s locked by another process, waiting up to %g s",
                            self.path, self.lock_wait_s)
                waiting = True
            elif time.monotonic() - noted >= LOCK_NOTE_S:
                noted = time.monotonic()
                log.debug("store %s still locked after %.0f s of %g s", self.path,
                          noted - began, self.lock_wait_s)

    def _make_private(self) -> None:
        """The store holds the bot's access token: create it 0600 (SQLite gives its -wal
        and -shm files the same mode), and tighten files an older version left readable."""
        try:
            private_file(self.path)
            for suffix in ("-wal", "-shm"):
                tighten(self.path.with_name(self.path.name + suffix))
        except OSError as exc:
            raise StoreError(f"cannot make {self.path} private: {exc.strerror or exc}") from None

    def _hold_file_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            private_file(lock_path)
            handle = open(lock_path, "r+")  # noqa: SIM115 - held open for the store's lifetime
        except OSError as exc:
            raise StoreError(f"cannot create lock file {lock_path}: {exc}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise StoreError(
                f"store {self.path} is in use by another matrixjobs process (pid {holder})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_file = handle

    async def _migrate(self) -> None:
        version = int(await self._scalar("PRAGMA user_version"))
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path}: schema version {version} is newer than this matrixjobs "
                f"understands ({len(MIGRATIONS)}); upgrade matrixjobs"
            )
        for number in range(version, len(MIGRATIONS)):
            # executescript commits any open transaction first, so wrap each step ourselves.
            step = MIGRATIONS[number]
            await self.db.executescript(
                f"BEGIN IMMEDIATE; {step}; PRAGMA user_version = {number + 1}; COMMIT;"
            )

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    @property
    def db(self) -> aiosqlite.Connection:
        """The one connection; every use outside `open` holds `_lock`."""
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    async def _scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        async with self.db.execute(sql, params) as cursor:
            row = await cursor.fetchone()
        return None if row is None else row[0]

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        """One write transaction at a time on the shared connection.

        A caller cancelled during BEGIN, COMMIT or ROLLBACK does not stop that
        statement on the database thread, and could leave a transaction open
        that every later BEGIN trips over. `_unfinished` remembers that, and the
        next transaction first rolls back whatever is left. A COMMIT that fails (or is
        cancelled) is rolled back at once, and the audit head read again.
        """
        async with self._lock:
            if self._unfinished:
                with contextlib.suppress(sqlite3.OperationalError):  # nothing was left open
                    await self.db.execute("ROLLBACK")
            self._unfinished = True
            self._unwritten = []
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
                await self._commit()
            except BaseException:
                self._audit_head = self._pending_head = None  # read it again next time
                with contextlib.suppress(sqlite3.OperationalError):  # COMMIT ended it
                    await self.db.execute("ROLLBACK")
                self._unfinished = False
                raise
            self._unfinished = False
            if self._pending_head is not None:
                self._audit_head, self._pending_head = self._pending_head, None

    async def _commit(self) -> None:
        """COMMIT, after the audit records the transaction appends, in one trip to the
        database thread: a trip there and back costs about as much as writing the record
        (bench/audit_overhead.py). If a record cannot be written, COMMIT is not reached."""
        if not self._unwritten:
            await self.db.execute("COMMIT")
            return
        rows = [audit_log.values(record) for record in self._unwritten]
        self._unwritten = []
        conn = self.db._conn  # aiosqlite runs nothing but single statements publicly

        def write_and_commit() -> None:
            conn.executemany(INSERT_AUDIT, rows)
            conn.execute("COMMIT")
        await self.db._execute(write_and_commit)

    # -- adding work -----------------------------------------------------------------------

    async def add_jobs(
        self, specs: Sequence[JobSpec], now: float, dedupe_key: str | None = None,
        show: ProgressMessage | None = None, audit: Entry | None = None,
    ) -> list[Job]:
        async with self._transaction():
            await self._claim_key(dedupe_key, specs, now)
            slot = await self._hold_slot(specs)
            jobs = await self._insert_jobs(specs, None, now)
            subject = jobs[0].id if len(jobs) == 1 else None
            await self._record_key(dedupe_key, subject)
            await self._record_slot(slot, subject)
            await self._insert_message(show, subject, now)
            if audit is not None:
                await self._audit(audit.about(jobs[0].id))
        return jobs

    async def add_batch(
        self, name: str, specs: Sequence[JobSpec], now: float, dedupe_key: str | None = None,
        show: ProgressMessage | None = None, approval: Approval | None = None,
        audit: Entry | None = None,
    ) -> tuple[Batch, list[Job]]:
        requester = specs[0].requester if specs else None
        trigger = specs[0].trigger if specs else None
        async with self._transaction():
            await self._claim_key(dedupe_key, specs, now)
            slot = await self._hold_slot(specs)
            cursor = await self.db.execute(
                "INSERT INTO batches (name, status, total, created_at, requester, approval, "
                "trigger_info) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, Status.PENDING, len(specs), now, requester, approval_text(approval),
                 trigger_text(trigger)),
            )
            number = cursor.lastrowid
            assert number is not None
            jobs = await self._insert_jobs(specs, number, now, approval)
            await self._record_key(dedupe_key, batch_id(number))
            await self._record_slot(slot, batch_id(number))
            await self._insert_message(show, batch_id(number), now)
            if audit is not None:
                await self._audit(audit.about(batch_id(number)))
        batch = Batch(id=batch_id(number), name=name, status=Status.PENDING,
                      total=len(specs), created_at=now, requester=requester, approval=approval,
                      trigger=trigger)
        return batch, jobs

    async def _claim_key(self, key: str | None, specs: Sequence[JobSpec], now: float) -> None:
        """Inside the adding transaction: refuse a key seen before, else reserve it."""
        if key is None:
            return
        rows = await self.db.execute_fetchall(
            "SELECT subject_id FROM processed_events WHERE event_id = ?", (key,)
        )
        if rows:
            raise AlreadySubmittedError(key, rows[0][0])
        await self.db.execute(
            "INSERT INTO processed_events (event_id, processed_at) VALUES (?, ?)", (key, now)
        )

    async def _record_key(self, key: str | None, subject: str | None) -> None:
        if key is not None and subject is not None:
            await self.db.execute(
                "UPDATE processed_events SET subject_id = ? WHERE event_id = ?", (subject, key)
            )

    async def _hold_slot(self, specs: Sequence[JobSpec]) -> Trigger | None:
        """Inside the adding transaction: refuse the work of a schedule's slot if the
        schedule is paused or the slot was dealt with, as committed now."""
        slot = schedule_slot(specs)
        if slot is None:
            return None
        rows = await self.db.execute_fetchall(SCHEDULE_OF_SLOT.format(p="?"), (slot.name,))
        if reason := slot_held(slot, schedule_from_row(tuple(rows[0])) if rows else None):
            raise SlotHeldError(reason)
        return slot

    async def _record_slot(self, slot: Trigger | None, subject: str | None) -> None:
        if slot is not None:
            await self.db.execute(SCHEDULE_DONE.format(p="?"), (slot.name, slot.slot, subject))

    async def _insert_message(
        self, show: ProgressMessage | None, subject: str | None, now: float
    ) -> None:
        if show is None or subject is None:
            return
        await self.db.execute(
            "INSERT OR REPLACE INTO progress_messages (subject_id, room_id, event_id, "
            "requester, reply_to, edits, final, created_at) VALUES (?, ?, ?, ?, ?, 0, 0, ?)",
            (subject, show.room_id, show.event_id, show.requester, show.reply_to, now),
        )

    async def _insert_jobs(
        self, specs: Sequence[JobSpec], batch_number: int | None, now: float,
        batch_approval: Approval | None = None,
    ) -> list[Job]:
        """Multi-row INSERTs: one round trip to the database thread per chunk, not per job."""
        jobs = []
        for start in range(0, len(specs), ROWS_PER_STATEMENT):
            chunk = specs[start:start + ROWS_PER_STATEMENT]
            params: list[Any] = []
            for spec in chunk:
                assert spec.max_retries is not None and spec.timeout_s is not None
                params += (spec.type, spec.name, json.dumps(spec.data), Status.PENDING,
                           spec.priority, spec.max_retries, spec.timeout_s, batch_number, now,
                           spec.requester, json.dumps(sorted(spec.runs_on)),
                           held(spec, batch_approval), approval_text(spec.approval),
                           trigger_text(spec.trigger), spec.concurrency)
            rows = await self.db.execute_fetchall(
                "INSERT INTO jobs (type, name, data, status, priority, max_retries, timeout_s, "
                "batch_id, created_at, requester, runs_on, run_after, approval, trigger_info, "
                f"concurrency) VALUES {_placeholders(len(chunk), 15)} RETURNING id",
                params,
            )
            # Rows are inserted in VALUES order with increasing ids; RETURNING's order is not
            # promised, so pair them up by sorting.
            numbers = sorted(row[0] for row in rows)
            jobs += [
                Job(
                    id=job_id(number), type=spec.type, name=spec.name, data=spec.data,
                    status=Status.PENDING, priority=spec.priority, retry_count=0,
                    max_retries=spec.max_retries or 0, timeout_s=spec.timeout_s or 0.0,
                    created_at=now,
                    batch_id=None if batch_number is None else batch_id(batch_number),
                    requester=spec.requester, runs_on=sorted(spec.runs_on),
                    run_after=held(spec, batch_approval), approval=spec.approval,
                    trigger=spec.trigger, concurrency=spec.concurrency,
                )
                for number, spec in zip(numbers, chunk, strict=True)
            ]
        return jobs

    # -- running work ----------------------------------------------------------------------

    async def settle_and_claim(
        self, outcomes: Sequence[Outcome], owner: str, limit: int, now: float, lease_s: float,
        labels: Sequence[str] = (), worker: str | None = None, ahead: int = 0,
        started: Sequence[str] = (),
    ) -> Cycle:
        cycle = Cycle()
        async with self._transaction():
            if started:  # claimed ahead, and now running: a crash spends a retry
                await self.db.executemany(
                    "UPDATE jobs SET claimed_ahead = 0, started_at = COALESCE(started_at, ?) "
                    "WHERE id = ? AND status = 'processing' AND owner = ?",
                    [(now, number_of(job), owner) for job in started])
            touched = await self._settle(outcomes, owner)
            await self._save_logs({o.job_id: o.log for o in outcomes if o.log is not None},
                                  "")
            if limit > 0:
                cycle.claimed = await self._claim(owner, limit, now, now + lease_s, labels,
                                                  worker, ahead)
                touched.update(j.batch_id for j in cycle.claimed if j.batch_id)
            cycle.batches = await self._refresh_batches(touched, now)
        return cycle

    async def _settle(self, outcomes: Sequence[Outcome], owner: str) -> set[str]:
        """Apply all outcomes with one UPDATE … FROM (VALUES …) per chunk."""
        touched: set[str] = set()
        for start in range(0, len(outcomes), ROWS_PER_STATEMENT):
            chunk = outcomes[start:start + ROWS_PER_STATEMENT]
            params: list[Any] = []
            for outcome in chunk:
                p = outcome.progress
                progress = (p.current, p.total, p.message) if p else (None, None, None)
                retry = outcome.retry_at is not None
                params += (
                    number_of(outcome.job_id),
                    Status.PENDING if retry else outcome.status,
                    int(retry and outcome.count_retry),
                    outcome.retry_at,
                    None if retry else outcome.finished_at,
                    outcome.error,
                    None if retry else dumps(outcome.result),
                    *progress,
                )
            rows = await self.db.execute_fetchall(
                "UPDATE jobs SET status = o.column2, retry_count = retry_count + o.column3, "
                "run_after = COALESCE(o.column4, run_after), finished_at = o.column5, "
                "error = o.column6, result = o.column7, progress_current = o.column8, "
                "progress_total = o.column9, progress_message = o.column10, "
                "owner = NULL, lease_expires_at = NULL, claimed_ahead = 0 "
                f"FROM (VALUES {_placeholders(len(chunk), 10)}) AS o "
                "WHERE jobs.id = o.column1 AND jobs.status = 'processing' AND jobs.owner = ? "
                "RETURNING jobs.batch_id",
                (*params, owner),
            )
            touched.update(batch_id(row[0]) for row in rows if row[0] is not None)
        return touched

    async def _claim(self, owner: str, limit: int, now: float, lease_until: float,
                     labels: Sequence[str], worker: str | None, ahead: int) -> list[Job]:
        """Claim up to `limit` due jobs; the last `ahead` of them are claimed ahead of a
        free slot: not started (no started_at) until settle_and_claim's `started` says so."""
        labels_json = json.dumps(list(labels))
        rows = await self.db.execute_fetchall(
            CLAIM, (owner, lease_until, worker, now, limit - ahead, now, labels_json, limit,
                    now, now, labels_json, limit, limit))
        jobs = [job_from_row(row) for row in rows]
        jobs.sort(key=lambda j: (-j.priority, number_of(j.id)))
        return jobs

    async def heartbeat(
        self, owner: str, progress: dict[str, Progress], now: float, lease_s: float,
        running: Sequence[str] = (),
    ) -> Heartbeat:
        async with self._transaction():
            numbers = [n for n in (checked_number(j, "j") for j in running) if n is not None]
            held = await self.db.execute_fetchall(
                "UPDATE jobs SET lease_expires_at = ? WHERE status = 'processing' AND owner = ? "
                "AND id IN (SELECT value FROM json_each(?)) "
                f"RETURNING id, cancel_requested OR {CANCELLED_BATCH}",
                (now + lease_s, owner, json.dumps(numbers)),
            )
            await self.db.execute("UPDATE workers SET heartbeat_at = ? WHERE id = ?",
                                  (now, owner))
            await self._save_progress(progress, owner)
        return heartbeat_of(running, held)

    async def save_progress(self, progress: dict[str, Progress], owner: str) -> None:
        if progress:
            async with self._transaction():
                await self._save_progress(progress, owner)

    async def _save_progress(self, progress: dict[str, Progress], owner: str) -> None:
        await self.db.executemany(
            "UPDATE jobs SET progress_current = ?, progress_total = ?, progress_message = ? "
            "WHERE id = ? AND status = 'processing' AND owner = ?",
            [(p.current, p.total, p.message, number_of(jid), owner)
             for jid, p in progress.items()],
        )

    async def save_logs(self, logs: dict[str, str]) -> None:
        async with self._transaction():
            await self._save_logs(logs, "AND status = 'processing'")

    async def _save_logs(self, logs: dict[str, str], condition: str) -> None:
        """One INSERT … SELECT FROM (VALUES …) per chunk: a per-row statement would cost
        tiny jobs a third of their throughput."""
        rows = [(number_of(job_id), text) for job_id, text in logs.items()]
        for start in range(0, len(rows), ROWS_PER_STATEMENT):
            chunk = rows[start:start + ROWS_PER_STATEMENT]
            await self.db.execute(
                "INSERT INTO job_logs (job_id, text) SELECT jobs.id, v.column2 "
                f"FROM (VALUES {_placeholders(len(chunk), 2)}) AS v "
                f"JOIN jobs ON jobs.id = v.column1 WHERE true {condition} "
                "ON CONFLICT (job_id) DO UPDATE SET text = excluded.text",
                [value for row in chunk for value in row],
            )

    async def get_log(self, job_id: str) -> str | None:
        number = checked_number(job_id, "j")
        if number is None:
            return None
        async with self._lock:
            return await self._scalar("SELECT text FROM job_logs WHERE job_id = ?", (number,))

    async def recover_interrupted(self, owner: str, now: float,
                                  stopped_owner: str | None = None,
                                  orphans: Sequence[str] = ()) -> Recovery:
        # Single-owner database (see module doc): any other owner's running job is orphaned.
        stale = "status = 'processing' AND (owner IS NULL OR owner != ?)"
        async with self._transaction():
            return await self._recover(stale, (owner,), now, stopped_owner)

    async def recover_expired(self, now: float) -> Recovery:
        async with self._transaction():
            return await self._recover("status = 'processing' AND lease_expires_at < ?",
                                       (now,), now, None)

    async def _recover(self, stale: str, params: tuple[Any, ...], now: float,
                       stopped_owner: str | None) -> Recovery:
        recovery = Recovery()
        clear = "owner = NULL, lease_expires_at = NULL"
        # A cancel asked for before the crash still holds; and a job given back to pending
        # after its batch was cancelled would wait for a claim that never comes.
        recovery.cancelled = await self._jobs(
            f"UPDATE jobs SET status = 'cancelled', finished_at = ?, error = 'cancelled', {clear} "
            f"WHERE (status = 'pending' OR ({stale})) "
            f"AND (cancel_requested = 1 OR {CANCELLED_BATCH}) RETURNING {JOB_COLUMNS}",
            (now, *params))
        # Claimed ahead, never started: as if never claimed.
        recovery.resumed = await self._jobs(
            f"UPDATE jobs SET status = 'pending', run_after = ?, claimed_ahead = 0, {clear} "
            f"WHERE {stale} AND claimed_ahead = 1 RETURNING {JOB_COLUMNS}", (now, *params))
        if stopped_owner is not None:
            recovery.resumed += await self._jobs(
                f"UPDATE jobs SET status = 'pending', run_after = ?, error = ?, {clear} "
                f"WHERE {stale} AND owner = ? RETURNING {JOB_COLUMNS}",
                (now, INTERRUPTED_BY_STOP, *params, stopped_owner))
        recovery.requeued = await self._jobs(
            "UPDATE jobs SET status = 'pending', retry_count = retry_count + 1, "
            f"run_after = ?, error = 'interrupted', {clear} "
            f"WHERE {stale} AND retry_count < max_retries RETURNING {JOB_COLUMNS}",
            (now, *params))
        recovery.failed = await self._jobs(
            f"UPDATE jobs SET status = 'failed', finished_at = ?, error = 'interrupted', {clear} "
            f"WHERE {stale} RETURNING {JOB_COLUMNS}", (now, *params))
        touched = {j.batch_id for j in recovery.ended if j.batch_id}
        recovery.batches = await self._refresh_batches(touched, now)
        return recovery

    async def _jobs(self, sql: str, params: Sequence[Any]) -> list[Job]:
        return [job_from_row(row) for row in await self.db.execute_fetchall(sql, params)]

    # -- cancelling ------------------------------------------------------------------------

    async def cancel_pending(self, job_id: str, now: float, audit: Entry | None = None
                             ) -> tuple[Job, Batch | None] | None:
        async with self._transaction():
            async with self.db.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?, error = 'cancelled' "
                f"WHERE id = ? AND status = 'pending' RETURNING {JOB_COLUMNS}",
                (now, number_of(job_id)),
            ) as cursor:
                row = await cursor.fetchone()
            batches = []
            if row is not None and row[9] is not None:
                batches = await self._refresh_batches({batch_id(row[9])}, now)
            if row is not None and audit is not None:
                await self._audit(audit)
        if row is None:
            return None
        return job_from_row(row), (batches[0] if batches else None)

    async def request_cancel(self, job_id: str, audit: Entry | None = None) -> bool:
        async with self._transaction():
            cursor = await self.db.execute(
                "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'processing'",
                (number_of(job_id),),
            )
            if cursor.rowcount == 1 and audit is not None:
                await self._audit(audit)
        return cursor.rowcount == 1

    async def cancel_batch(self, batch_id_: str, now: float, audit: Entry | None = None
                           ) -> BatchCancel | None:
        number = number_of(batch_id_)
        async with self._transaction():
            await self.db.execute(
                "UPDATE batches SET cancel_requested = 1 WHERE id = ? AND finished_at IS NULL",
                (number,),
            )
            async with self.db.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?, error = 'cancelled' "
                f"WHERE batch_id = ? AND status = 'pending' RETURNING {JOB_COLUMNS}",
                (now, number),
            ) as cursor:
                cancelled = [job_from_row(row) for row in await cursor.fetchall()]
            async with self.db.execute(
                "SELECT id FROM jobs WHERE batch_id = ? AND status = 'processing'", (number,)
            ) as cursor:
                running = [job_id(row[0]) for row in await cursor.fetchall()]
            batches = await self._refresh_batches({batch_id_}, now)
            if batches and audit is not None:
                await self._audit(audit)
        if not batches:
            return None
        return BatchCancel(batch=batches[0], cancelled=cancelled, running=running)

    # -- approvals -------------------------------------------------------------------------

    async def set_approval(self, subject_id: str, before: Approval, after: Approval,
                           release_at: float | None, audit: Entry | None = None) -> bool:
        table, column = approval_table(subject_id)
        async with self._transaction():
            cursor = await self.db.execute(
                f"UPDATE {table} SET approval = ? WHERE id = ? AND approval = ? "
                "AND status = 'pending'",
                (after.to_json(), number_of(subject_id), before.to_json()))
            if cursor.rowcount != 1:
                return False
            if audit is not None:
                await self._audit(audit)
            if release_at is not None:
                await self.db.execute(
                    f"UPDATE jobs SET run_after = ? WHERE {column} = ? AND status = 'pending' "
                    "AND run_after >= ?", (release_at, number_of(subject_id), HELD_UNTIL))
        return True

    async def awaiting_approval(self) -> list[tuple[str, Approval]]:
        async with self._lock:
            rows = await self.db.execute_fetchall(AWAITING_APPROVAL.format(p="?"),
                                                  (HELD_UNTIL, HELD_UNTIL))
        return approvals_of(list(rows))

    # -- the audit log ---------------------------------------------------------------------

    async def _audit(self, entry: Entry) -> Record:
        """Inside a write transaction: `entry` as the chain's next record, written with the
        transaction's COMMIT (`_commit`). The head is read once and then kept as committed:
        this process alone writes the store (it holds its lock), and the record itself
        moves the stored head (AUDIT_HEAD). A record is never dated before the one it
        follows (a clock set back), so a time is found by bisection (FIRST_SINCE)."""
        head = self._pending_head or self._audit_head
        if head is None:
            async with self.db.execute(AUDIT_HEAD) as cursor:
                row = await cursor.fetchone()
            assert row is not None
            head = (int(row[0]), str(row[1]), float(row[2]))
        record = audit_log.chained(entry, head[0] + 1, max(time.time(), head[2]), head[1])
        self._unwritten.append(record)
        self._pending_head = (record.seq, record.hash, record.at)
        return record

    async def append_audit(self, entry: Entry) -> Record:
        async with self._transaction():
            return await self._audit(entry)

    async def _first_since(self, at: float) -> int:
        async with self.db.execute(FIRST_SINCE, (at, at)) as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    async def audit_records(self, query: AuditQuery) -> list[Record]:
        forward = query.forward
        async with self._lock:
            if query.since is not None:
                first = await self._first_since(query.since)
                query = replace(query, since=None, after=max(query.after or 0, first - 1))
            where, params = audit_log.audit_filter(query, "?")
            rows = await self.db.execute_fetchall(
                f"SELECT {audit_log.COLUMNS} FROM audit {where} "
                f"ORDER BY seq {'ASC' if forward else 'DESC'} LIMIT ?", (*params, query.limit))
        records = [audit_log.record_of(tuple(row)) for row in rows]
        return records if forward else records[::-1]

    async def audit_chain(self) -> tuple[list[Record], tuple[int, str]]:
        async with self._lock:
            rows = await self.db.execute_fetchall(
                f"SELECT {audit_log.COLUMNS} FROM audit ORDER BY seq")
            head = await self.db.execute_fetchall(AUDIT_HEAD)
        return [audit_log.record_of(tuple(row)) for row in rows], (head[0][0], head[0][1])

    async def prune_audit(self, before: float) -> int:
        async with self._transaction():
            async with self.db.execute(
                    f"SELECT {audit_log.COLUMNS} FROM audit WHERE seq < ? ORDER BY seq DESC "
                    "LIMIT 1", (await self._first_since(before),)) as cursor:
                row = await cursor.fetchone()
            if row is None:
                return 0
            last = audit_log.record_of(tuple(row))
            cursor = await self.db.execute("DELETE FROM audit WHERE seq <= ?", (last.seq,))
            removed = max(cursor.rowcount, 0)
            await self._audit(audit_log.pruned(last, removed))
        return removed

    # -- personal tokens -------------------------------------------------------------------

    async def add_token(self, digest: str, token: PersonalToken, audit: Entry) -> None:
        async with self._transaction():
            try:
                await self.db.execute(
                    "INSERT INTO tokens (digest, user_id, name, created_at) VALUES (?, ?, ?, ?)",
                    (digest, token.user, token.name, token.created_at))
            except sqlite3.IntegrityError:
                raise TokenExistsError(token_exists(token)) from None
            await self._audit(audit)

    async def list_tokens(self, user: str | None) -> list[PersonalToken]:
        async with self._lock:
            rows = await self.db.execute_fetchall(
                "SELECT user_id, name, created_at FROM tokens WHERE ? IS NULL OR user_id = ? "
                "ORDER BY user_id, created_at", (user, user))
        return [PersonalToken(*row) for row in rows]

    async def revoke_token(self, user: str, name: str, audit: Entry) -> bool:
        async with self._transaction():
            cursor = await self.db.execute(
                "DELETE FROM tokens WHERE user_id = ? AND name = ?", (user, name))
            if cursor.rowcount != 1:
                return False
            await self._audit(audit)
        return True

    async def token_owner(self, digest: str) -> str | None:
        async with self._lock:
            rows = await self.db.execute_fetchall(
                "SELECT user_id FROM tokens WHERE digest = ?", (digest,))
        return rows[0][0] if rows else None

    # -- schedules -------------------------------------------------------------------------

    async def schedule_states(self) -> list[ScheduleState]:
        async with self._lock:
            rows = await self.db.execute_fetchall(f"SELECT {SCHEDULE_COLUMNS} FROM schedules")
        return [schedule_from_row(tuple(row)) for row in rows]

    async def schedule_done(self, name: str, slot: float, subject_id: str | None) -> None:
        async with self._transaction():
            await self.db.execute(SCHEDULE_DONE.format(p="?"), (name, slot, subject_id))

    async def rebase_schedule(self, name: str, slot: float, cron: str, timezone: str) -> None:
        async with self._transaction():
            await self.db.execute(SCHEDULE_REBASE.format(p="?"), (name, slot, cron, timezone))

    async def pause_schedule(self, name: str, paused_by: str | None, passed: float,
                             audit: Entry) -> bool:
        async with self._transaction():
            if paused_by is None:
                cursor = await self.db.execute(SCHEDULE_RESUME.format(p="?"),
                                               (passed, passed, name))
            else:
                cursor = await self.db.execute(SCHEDULE_PAUSE.format(p="?"),
                                               (name, passed, paused_by, time.time()))
            if cursor.rowcount != 1:
                return False
            await self._audit(audit)
        return True

    # -- progress messages and settings (for interfaces) ------------------------------------

    async def save_message(self, message: ProgressMessage, now: float) -> None:
        async with self._transaction():
            await self.db.execute(
                "INSERT OR REPLACE INTO progress_messages (subject_id, room_id, event_id, "
                "requester, reply_to, edits, final, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (message.subject_id, message.room_id, message.event_id, message.requester,
                 message.reply_to, message.edits, int(message.final), now),
            )

    async def key_subject(self, key: str) -> tuple[bool, str | None]:
        async with self._lock:
            rows = await self.db.execute_fetchall(
                "SELECT subject_id FROM processed_events WHERE event_id = ?", (key,))
        return (True, rows[0][0]) if rows else (False, None)

    async def message_subject(self, room_id: str, event_id: str) -> str | None:
        # No index on event_id: asked once per reaction, over rows that retention bounds.
        async with self._lock:
            rows = await self.db.execute_fetchall(
                "SELECT subject_id FROM progress_messages WHERE event_id = ? AND room_id = ?",
                (event_id, room_id),
            )
        return rows[0][0] if rows else None

    async def update_message(self, subject_id: str, edits: int, final: bool) -> None:
        async with self._transaction():
            await self.db.execute(
                "UPDATE progress_messages SET edits = ?, final = ? WHERE subject_id = ?",
                (edits, int(final), subject_id),
            )

    async def open_messages(self) -> list[ProgressMessage]:
        async with self._lock:
            rows = await self.db.execute_fetchall(
                "SELECT subject_id, room_id, event_id, requester, reply_to, edits, final "
                "FROM progress_messages WHERE final = 0 ORDER BY created_at"
            )
        return [ProgressMessage(s, r, e, q, t, n, bool(f)) for s, r, e, q, t, n, f in rows]

    async def group_jobs(self, group: str) -> list[Job]:
        async with self._lock:
            rows = await self.db.execute_fetchall(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE concurrency = ? AND status IN "
                "('pending', 'processing') ORDER BY status = 'pending', id", (group,))
        return [job_from_row(row) for row in rows]

    async def active_groups(self) -> list[str]:
        async with self._lock:
            rows = await self.db.execute_fetchall(
                "SELECT DISTINCT concurrency FROM jobs WHERE concurrency IS NOT NULL AND "
                "status IN ('pending', 'processing') ORDER BY concurrency")
        return [str(row[0]) for row in rows]

    async def unsent_messages(self) -> list[ProgressMessage]:
        async with self._lock:
            rows = await self.db.execute_fetchall(
                "SELECT subject_id, room_id, event_id, requester, reply_to, edits, final "
                "FROM progress_messages WHERE final = 0 AND event_id IS NULL AND reply_to = '' "
                "ORDER BY created_at"
            )
        return [ProgressMessage(s, r, e, q, t, n, bool(f)) for s, r, e, q, t, n, f in rows]

    async def get_message(self, subject_id: str) -> ProgressMessage | None:
        async with self._lock:
            rows = await self.db.execute_fetchall(
                "SELECT subject_id, room_id, event_id, requester, reply_to, edits, final "
                "FROM progress_messages WHERE subject_id = ?", (subject_id,)
            )
        return next((ProgressMessage(s, r, e, q, t, n, bool(f))
                     for s, r, e, q, t, n, f in rows), None)

    async def get_setting(self, key: str) -> str | None:
        async with self._lock:
            rows = await self.db.execute_fetchall("SELECT value FROM settings WHERE key = ?",
                                                  (key,))
        return rows[0][0] if rows else None

    async def set_patience(self, patient: bool) -> None:
        wait_ms = BUSY_TIMEOUT_MS if patient else LOCK_POLL_MS
        await self.db.execute(f"PRAGMA busy_timeout = {wait_ms}")

    async def set_setting(self, key: str, value: str) -> None:
        async with self._transaction():
            await self.db.execute(
                "INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value)
            )

    # -- the fleet -------------------------------------------------------------------------

    async def register_worker(self, worker: Worker) -> None:
        async with self._transaction():
            await self.db.execute(
                f"INSERT OR REPLACE INTO workers ({WORKER_COLUMNS}) VALUES "
                f"{_placeholders(1, 10)}", worker_values(worker),
            )

    async def unregister_worker(self, worker_id: str) -> None:
        async with self._transaction():
            await self.db.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    async def list_workers(self) -> list[Worker]:
        async with self._lock:
            rows = await self.db.execute_fetchall(
                f"SELECT {WORKER_COLUMNS} FROM workers ORDER BY name, id")
            running = await self.db.execute_fetchall(RUNNING_BY_OWNER)
        return with_running([worker_from_row(row) for row in rows], list(running))

    # -- batches ---------------------------------------------------------------------------

    async def _refresh_batches(self, ids: Iterable[str], now: float) -> list[Batch]:
        """Recount each batch from its jobs, settle its status, and return it."""
        batches = []
        for bid in sorted(ids):
            number = number_of(bid)
            counts = {status: 0 for status in Status}
            async with self.db.execute(
                "SELECT status, count(*) FROM jobs WHERE batch_id = ? GROUP BY status", (number,)
            ) as cursor:
                for status, count in await cursor.fetchall():
                    counts[Status(status)] = count
            async with self.db.execute(
                f"SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?", (number,)
            ) as cursor:
                row = await cursor.fetchone()
            if row is None:
                continue
            batch = batch_from_row(row)
            recount(batch, counts, now)
            await self.db.execute(
                "UPDATE batches SET status = ?, completed = ?, failed = ?, cancelled = ?, "
                "started_at = ?, finished_at = ? WHERE id = ?",
                (batch.status, batch.completed, batch.failed, batch.cancelled,
                 batch.started_at, batch.finished_at, number),
            )
            batch.errors = await self._batch_errors(number)
            batches.append(batch)
        return batches

    async def _batch_errors(self, number: int) -> list[str]:
        async with self.db.execute(
            "SELECT id, name, error FROM jobs WHERE batch_id = ? AND status IN "
            "('failed', 'cancelled') ORDER BY id LIMIT ?",
            (number, ERRORS_PER_BATCH),
        ) as cursor:
            rows = await cursor.fetchall()
        return [f"{job_id(jid)} {name}: {first_line(error)}" for jid, name, error in rows]

    # -- reading ---------------------------------------------------------------------------

    async def next_due(self) -> float | None:
        async with self._lock:
            value = await self._scalar("SELECT min(run_after) FROM jobs WHERE status = 'pending' "
                                       "AND run_after < ?", (HELD_UNTIL,))
        return None if value is None else float(value)

    async def get_job(self, job_id_: str) -> Job | None:
        number = checked_number(job_id_, "j")
        if number is None:
            return None
        async with self._lock, self.db.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (number,)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else job_from_row(row)

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        numbers = [n for n in (checked_number(j, "j") for j in job_ids) if n is not None]
        jobs = []
        async with self._lock:
            for start in range(0, len(numbers), ROWS_PER_STATEMENT):
                chunk = numbers[start:start + ROWS_PER_STATEMENT]
                rows = await self.db.execute_fetchall(
                    f"SELECT {JOB_COLUMNS} FROM jobs WHERE id IN "
                    f"({', '.join('?' * len(chunk))}) ORDER BY id", chunk)
                jobs += [job_from_row(row) for row in rows]
        return sorted(jobs, key=lambda job: number_of(job.id))

    async def get_batch(self, batch_id_: str) -> Batch | None:
        number = checked_number(batch_id_, "b")
        if number is None:
            return None
        async with self._lock:
            async with self.db.execute(
                f"SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?", (number,)
            ) as cursor:
                row = await cursor.fetchone()
            if row is None:
                return None
            batch = batch_from_row(row)
            batch.errors = await self._batch_errors(number)
        return batch

    async def previous_outcome(self, subject_id: str) -> Status | None:
        parsed = parse_id(subject_id)
        if parsed is None:
            return None
        table = "batches" if parsed[0] == "b" else "jobs"
        async with self._lock:
            value = await self._scalar(
                f"SELECT earlier.status FROM {table} AS this JOIN {table} AS earlier "
                "ON earlier.name = this.name AND earlier.id != this.id "
                "WHERE this.id = ? AND earlier.status IN ('completed', 'failed') "
                "AND earlier.finished_at <= this.finished_at "
                "ORDER BY earlier.finished_at DESC, earlier.id DESC LIMIT 1",
                (parsed[1],),
            )
        return None if value is None else Status(value)

    async def list_jobs(
        self,
        statuses: Sequence[Status] | None = None,
        batch_id: str | None = None,
        limit: int = 50,
    ) -> list[Job]:
        where, params = _status_filter(statuses)
        if batch_id is not None:
            where.append("batch_id = ?")
            params.append(number_of(batch_id))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        async with self._lock, self.db.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs {clause} ORDER BY id DESC LIMIT ?",
            (*params, limit),
        ) as cursor:
            return [job_from_row(row) for row in await cursor.fetchall()]

    async def count_jobs(self) -> dict[Status, int]:
        async with self._lock, self.db.execute(
            "SELECT status, count(*) FROM jobs GROUP BY status"
        ) as cursor:
            return {Status(status): count for status, count in await cursor.fetchall()}

    async def list_batches(
        self, statuses: Sequence[Status] | None = None, limit: int = 50
    ) -> list[Batch]:
        where, params = _status_filter(statuses)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        async with self._lock:
            async with self.db.execute(
                f"SELECT {BATCH_COLUMNS} FROM batches {clause} ORDER BY id DESC LIMIT ?",
                (*params, limit),
            ) as cursor:
                batches = [batch_from_row(row) for row in await cursor.fetchall()]
            for batch in batches:
                batch.errors = await self._batch_errors(number_of(batch.id))
        return batches

    async def purge_finished(self, before: float) -> int:
        async with self._transaction():
            removed = 0
            for sql in (
                "DELETE FROM batches WHERE finished_at < ?",
                "DELETE FROM jobs WHERE finished_at < ? AND batch_id IS NULL",
                "DELETE FROM processed_events WHERE processed_at < ?",
            ):
                cursor = await self.db.execute(sql, (before,))
                removed += max(cursor.rowcount, 0)
            await self.db.execute("DELETE FROM workers WHERE heartbeat_at < ?", (before,))
            await self.db.execute(
                "DELETE FROM progress_messages WHERE created_at < ? AND subject_id NOT IN "
                "(SELECT 'j' || id FROM jobs UNION ALL SELECT 'b' || id FROM batches)",
                (before,),
            )
        return removed


def _placeholders(rows: int, columns: int) -> str:
    row = "(" + ", ".join("?" * columns) + ")"
    return ", ".join([row] * rows)


def _status_filter(statuses: Sequence[Status] | None) -> tuple[list[str], list[Any]]:
    if not statuses:
        return [], []
    marks = ", ".join("?" for _ in statuses)
    return [f"status IN ({marks})"], [str(s) for s in statuses]


def _explain(exc: sqlite3.DatabaseError) -> str:
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return f"{text} (the file is corrupt or not a matrixjobs database)"
    if "locked" in text:
        return f"{text} (another process holds a lock on it)"
    return text

"""Whether the store takes writes now, and if not, why: the one answer /healthz, the
metrics, the API's refusals and the rooms all give.

A store fault is one of three kinds a person can act on: the disk is full (or below the
`[store] min_free_mb` floor), another process holds the store locked, or the database
cannot be reached. Anything else a store raises is a bug, not a fault of the store.
Every failed store operation with a fault reports it; the service's probe (a small real
write, and the free space where the store is a file) reports both failures and recovery.
An operation waiting on a store that cannot be reached (a PostgreSQL pool waits 30 s for a
connection) may ask to be told the moment that is known (`until_unreachable`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from enum import StrEnum

from matrixjobs.errors import StoreUnavailableError

log = logging.getLogger(__name__)

# How long a client should wait before trying again, once told the store is unavailable.
RETRY_AFTER_S = 10
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class StoreFault(StrEnum):
    DISK_FULL = "disk full"
    LOCKED = "locked"
    UNREACHABLE = "unreachable"


def classify(exc: BaseException) -> StoreFault | None:
    """The fault behind a store operation's failure (looking through wrapped causes)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        fault = _fault_of(current)
        if fault is not None:
            return fault
        current = current.__cause__ or current.__context__
    return None


def _fault_of(exc: BaseException) -> StoreFault | None:
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc)
        if "disk is full" in text or "disk I/O error" in text:
            return StoreFault.DISK_FULL
        if "locked" in text or "busy" in text:
            return StoreFault.LOCKED
        return None
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return StoreFault.DISK_FULL
    # psycopg is loaded only by those whose store is PostgreSQL.
    psycopg = sys.modules.get("psycopg")
    pool = sys.modules.get("psycopg_pool")
    if psycopg is not None and isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        if getattr(exc, "sqlstate", None) in ("53100", "53200"):  # disk full, out of memory
            return StoreFault.DISK_FULL
        return StoreFault.UNREACHABLE
    if pool is not None and isinstance(exc, pool.PoolTimeout):
        return StoreFault.UNREACHABLE
    if isinstance(exc, ConnectionError | TimeoutError):
        return StoreFault.UNREACHABLE
    return None


def troubled(exc: BaseException) -> bool:
    """Whether `exc` is the store in trouble (a fault, or the error that says one): one log
    line says all there is; a traceback would point at no bug."""
    return isinstance(exc, StoreUnavailableError) or classify(exc) is not None


class StoreHealth:
    """The store's state as last seen: up, or down with a fault since some time."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.fault: StoreFault | None = None
        self.detail: str | None = None  # e.g. "42 MiB free, below the floor of 100 MiB"
        self.since: float | None = None
        self.errors: dict[StoreFault, int] = dict.fromkeys(StoreFault, 0)
        self._waiting: set[Callable[[], None]] = set()

    @property
    def up(self) -> bool:
        return self.fault is None

    @property
    def reason(self) -> str:
        """"store: disk full" and the like, for /healthz, refusals and banners."""
        if self.fault is None:
            return "store: ok"
        return f"store: {self.fault}" + (f" ({self.detail})" if self.detail else "")

    def failed(self, exc: BaseException) -> StoreFault | None:
        """Note a failed store operation; its fault, or None (not the store's fault)."""
        fault = classify(exc)
        if fault is not None:
            self.down(fault)
        return fault

    def down(self, fault: StoreFault, detail: str | None = None) -> None:
        self.errors[fault] += 1
        if self.fault != fault:
            log.warning("the store is unavailable (%s): new jobs are refused until it "
                        "recovers; running jobs go on and their outcomes wait in memory",
                        fault + (f", {detail}" if detail else ""))
            self.since = self._clock()
        else:
            log.debug("the store is still unavailable (%s, %d errors of this kind)",
                      fault + (f", {detail}" if detail else ""), self.errors[fault])
        self.fault, self.detail = fault, detail
        if fault is StoreFault.UNREACHABLE:
            for give_up in list(self._waiting):
                give_up()

    @contextlib.contextmanager
    def until_unreachable(self, give_up: Callable[[], None]) -> Iterator[None]:
        """Call `give_up` if the store is found unreachable meanwhile: what waits on it
        need not wait out the pool's timeout."""
        self._waiting.add(give_up)
        try:
            yield
        finally:
            self._waiting.discard(give_up)

    def worked(self) -> None:
        if self.fault is not None:
            log.info("the store works again (it was unavailable for %.0f s: %s); new jobs "
                     "are taken", self._clock() - (self.since or self._clock()), self.fault)
        self.fault = self.detail = self.since = None

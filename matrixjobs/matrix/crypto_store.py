"""The crypto store at rest: the secret key nio pickles the device's private keys with, and
the move away from nio's public default key.

nio pickles (encrypts) the Olm account, the Olm sessions and the inbound Megolm sessions
with `AsyncClientConfig.pickle_key`; outbound Megolm sessions live in memory only. Its
default key, "DEFAULT_KEY", is public: with it, anyone who can read the store reads the
device's keys. The key comes from MATRIXJOBS_PICKLE_KEY, else from a key file beside the
SQLite store that the bot creates at first start. A store made with the default key is
re-keyed once, in one SQLite transaction: a crash halfway leaves it as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from nio.crypto import InboundGroupSession, OlmAccount, Session
from nio.store import DefaultStore
from pydantic import SecretStr

from matrixjobs.private import FILE_MODE, private_file, tighten

log = logging.getLogger(__name__)

DEFAULT_PICKLE_KEY = "DEFAULT_KEY"  # matrix-nio's default, what stores made before used
PICKLE_KEY_ENV = "MATRIXJOBS_PICKLE_KEY"
KEY_BYTES = 32


class CryptoStoreError(Exception):
    """The pickle key cannot be had; the message says why (never the key)."""


class PickleKeyError(CryptoStoreError):
    """A crypto store that opens with neither our pickle key nor nio's default one."""

    def __init__(self, database: Path) -> None:
        super().__init__(f"the crypto store {database} does not open with the configured "
                         "pickle key (nor with nio's old default key)")
        self.database = database


@dataclass(frozen=True, slots=True)
class PickleKey:
    value: str
    source: str  # where it came from, for log lines


def load_pickle_key(configured: SecretStr | None, key_file: Path) -> PickleKey:
    """MATRIXJOBS_PICKLE_KEY if set, else the key in `key_file`, created (0600) if missing."""
    if configured is not None:
        return PickleKey(configured.get_secret_value(), PICKLE_KEY_ENV)
    try:
        key = _read_key(key_file) or _create_key(key_file)
    except OSError as exc:
        raise CryptoStoreError(f"cannot read or create the pickle key file {key_file}: "
                               f"{exc.strerror or exc}") from None
    return PickleKey(key, f"the key file {key_file}")


def _read_key(key_file: Path) -> str | None:
    try:
        tighten(key_file)
        key = key_file.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        key = ""
    if not key:
        raise CryptoStoreError(f"the pickle key file {key_file} is empty or damaged: restore "
                               f"it from the backup, or set {PICKLE_KEY_ENV}")
    return key


def _create_key(key_file: Path) -> str:
    key = secrets.token_urlsafe(KEY_BYTES)
    fd, temp = tempfile.mkstemp(dir=key_file.parent, prefix=f".{key_file.name}.")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(key + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        # A link appears whole, and never replaces a key another process wrote meanwhile.
        os.link(temp, key_file)
    except FileExistsError:  # another process created it meanwhile: use theirs
        theirs = _read_key(key_file)
        if theirs is None:
            raise
        return theirs
    finally:
        Path(temp).unlink(missing_ok=True)
    log.warning("matrix: created the crypto store's pickle key in %s (mode 0600); back it "
                "up with the crypto store: the store cannot be opened without it", key_file)
    return key


def rekey(database: Path, key: str) -> None:
    """Make the crypto database open with `key`. One pickled with nio's default key is
    re-keyed in one transaction; one that opens with neither raises PickleKeyError and is
    left untouched."""
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as db:
        db.execute("PRAGMA secure_delete = ON")  # freed pages of old pickles are zeroed
        db.execute("BEGIN IMMEDIATE")
        try:
            counts = _rekey(db, database, key)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    if counts is not None:
        log.warning("matrix: re-keyed the crypto store %s, pickled with nio's public default "
                    "key, to the configured pickle key (%d account, %d Olm and %d Megolm "
                    "sessions)", database, *counts)


def _rekey(db: sqlite3.Connection, database: Path, key: str) -> tuple[int, int, int] | None:
    """The rows re-keyed (accounts, Olm sessions, Megolm sessions); None: none needed."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    if "accounts" not in tables:
        return None  # a new store: nio creates its tables
    accounts = db.execute("SELECT rowid, account, shared FROM accounts").fetchall()
    if not accounts or _opens(accounts[0][1], key):
        return None
    if not _opens(accounts[0][1], DEFAULT_PICKLE_KEY):
        raise PickleKeyError(database)
    old = DEFAULT_PICKLE_KEY
    for rowid, pickle, shared in accounts:
        account = OlmAccount.from_pickle(pickle, old, bool(shared))
        db.execute("UPDATE accounts SET account = ? WHERE rowid = ?",
                   (account.pickle(key), rowid))
    olm = db.execute("SELECT rowid, session FROM olmsessions").fetchall()
    for rowid, pickle in olm:
        # The creation time is stored beside the pickle, not in it.
        session = Session.from_pickle(pickle, datetime.now(), old)
        db.execute("UPDATE olmsessions SET session = ? WHERE rowid = ?",
                   (session.pickle(key), rowid))
    megolm = db.execute("SELECT rowid, session FROM megolminboundsessions").fetchall()
    for rowid, pickle in megolm:
        # Keys and room are stored beside the pickle too: only the pickle is rewritten.
        group = InboundGroupSession.from_pickle(pickle, "", "", "", old)
        db.execute("UPDATE megolminboundsessions SET session = ? WHERE rowid = ?",
                   (group.pickle(key), rowid))
    return len(accounts), len(olm), len(megolm)


def _opens(pickle: bytes, key: str) -> bool:
    try:
        OlmAccount.from_pickle(pickle, key)
    except ValueError:  # vodozemac's pickle errors: a wrong key fails the MAC check
        return False
    return True


@dataclass
class PrivateStore(DefaultStore):
    """nio's default store, whose database is created 0600 and re-keyed from nio's
    default key (once) before nio opens it: the one way nio loads a device's store."""

    def __post_init__(self) -> None:
        name = self.database_name or f"{self.user_id}_{self.device_id}.db"
        database = Path(self.store_path) / name
        private_file(database)  # SQLite gives its journal the same mode
        rekey(database, self.pickle_key)
        super().__post_init__()

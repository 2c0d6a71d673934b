"""Log lines for people and journald: `LEVEL logger: message` on stderr, secrets masked.

When stderr goes to journald (`$JOURNAL_STREAM` names it) each line starts with a syslog
priority such as `<4>`, which journald turns into the entry's priority (`journalctl -p
warning` works) and strips; journald stamps the time itself. Elsewhere lines carry their
own time stamp.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import sys
import threading
from collections.abc import Callable, Iterable
from logging.handlers import QueueHandler, QueueListener

MASK = "***"
# Tokens by shape too, for ones not known yet when logged (a fresh login's, in a dump).
TOKEN_FIELD = re.compile(r"""(access_token['"]?\s*[:=]\s*['"]?)[^'"\s,&}]+""")
SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                   logging.CRITICAL: 2}
# Shorter values are not worth masking: they would mask ordinary words.
MIN_SECRET_LEN = 6

_secrets: set[str] = set()


def mask(values: Iterable[str | None]) -> None:
    """Never show these values in a log line (passwords, tokens, also ones learnt later)."""
    _secrets.update(v for v in values if v and len(v) >= MIN_SECRET_LEN)


class ServiceFormatter(logging.Formatter):
    def __init__(self, journald: bool) -> None:
        stamp = "" if journald else "%(asctime)s "
        super().__init__(f"{stamp}%(levelname)s %(name)s: %(message)s")
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = redact(super().format(record))
        if not self.journald:
            return text
        # Every line of a traceback is its own journal entry: each gets the priority.
        priority = SYSLOG_PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def to_journal(stream_fd: int = 2) -> bool:
    """Whether stderr is journald's stream: `$JOURNAL_STREAM` names its device and inode
    (a shell started from a service inherits the variable with stderr elsewhere)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        stat = os.fstat(stream_fd)
    except OSError:
        return False
    return f"{stat.st_dev}:{stat.st_ino}" == f"{device}:{inode}"


# What other libraries may log, whatever `--log-level` says: their debug and info lines carry
# what must never reach a journal. The most specific prefix of a logger's name decides;
# any library not named here is held at WARNING too.
LIBRARY_FLOOR = logging.WARNING
OFF = logging.CRITICAL + 1
LIBRARY_LEVELS = {
    "peewee": LIBRARY_FLOOR,  # nio's crypto store: every SQL statement with the pickled keys
    "aiosqlite": LIBRARY_FLOOR,  # every statement with its parameters (the access token)
    "nio": LIBRARY_FLOOR,  # every room event at INFO, whole responses (tokens) at DEBUG
    # Validation failures quote the whole event or response: message text, tokens.
    "nio.events": OFF,
    "nio.responses": OFF,
    "uvicorn.error": LIBRARY_FLOOR,  # we log start/stop ourselves
    "uvicorn.access": OFF,  # request lines: query strings may carry tokens
    "mcp": LIBRARY_FLOOR,  # JSON-RPC messages: tool arguments and results
}
OURS = "matrixjobs"


def library_level(name: str) -> int:
    """The lowest level a record of logger `name` is shown at (ours: any)."""
    if name == OURS or name.startswith(OURS + "."):
        return logging.NOTSET
    while name:
        if name in LIBRARY_LEVELS:
            return LIBRARY_LEVELS[name]
        name = name.rpartition(".")[0]
    return LIBRARY_FLOOR


class LibraryFilter(logging.Filter):
    """Holds other libraries' records back below their level in LIBRARY_LEVELS, on the
    handler: a library that sets its own logger's level, or one imported later, cannot
    get past it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= library_level(record.name)


def service_handler(handler: logging.Handler, journald: bool = False) -> logging.Handler:
    """`handler` as every log of the service needs it: our format, secrets masked,
    libraries held back."""
    handler.setFormatter(ServiceFormatter(journald))
    handler.addFilter(LibraryFilter())
    return handler


# Lines waiting for the writer thread; beyond this they are dropped (and counted).
BACKLOG = 10_000
# How long the last lines may take to go out at exit (a stuck reader must not hold it).
CLOSE_WAIT_S = 2.0


class BackgroundHandler(QueueHandler):
    """Writes through `target` from a thread: when stderr's reader stalls (a busy or hung
    journald), a write would block, and with it the event loop and everything on it.
    Records beyond BACKLOG are dropped and counted, and a line says so once writing
    resumes."""

    def __init__(self, target: logging.Handler, backlog: int = BACKLOG) -> None:
        super().__init__(queue.Queue(backlog))
        self.dropped = 0
        self._unreported = 0
        self._closed = False
        self._listener = QueueListener(self.queue, target, respect_handler_level=True)
        self._listener.start()

    def enqueue(self, record: logging.LogRecord) -> None:
        if self._unreported and self._offer(self._drop_note()):
            self._unreported = 0
        if not self._offer(record):
            self.dropped += 1
            self._unreported += 1

    def _offer(self, record: logging.LogRecord) -> bool:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            return False
        return True

    def _drop_note(self) -> logging.LogRecord:
        return logging.makeLogRecord({
            "name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
            "msg": f"{self._unreported} log lines were dropped: the log's reader was not "
                   "keeping up",
        })

    def close(self) -> None:
        """Let queued lines out, but wait at most CLOSE_WAIT_S for a reader that stalls.
        Closed again by logging at exit: only the first time counts."""
        if not self._closed:
            self._closed = True
            stopper = threading.Thread(target=self._listener.stop, daemon=True)
            stopper.start()
            stopper.join(CLOSE_WAIT_S)
        super().close()


class FdHandler(logging.Handler):
    """Writes each line straight to a file descriptor, without Python's buffered stream or
    a handler lock: only BackgroundHandler's thread writes here, and when that thread is
    stuck in a write nobody reads, nothing else (logging's flush at exit) may wait on it."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def createLock(self) -> None:
        self.lock = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = memoryview((self.format(record) + "\n").encode(errors="replace"))
            while data:
                data = data[os.write(self.fd, data):]
        except Exception:
            self.handleError(record)


def setup_logging(level: str) -> None:
    root = logging.getLogger()
    stream = service_handler(FdHandler(2), journald=to_journal())
    front = BackgroundHandler(stream)
    front.addFilter(LibraryFilter())  # before the queue: held-back records cost nothing
    root.handlers[:] = [front]
    root.setLevel(getattr(logging, level.upper()))
    quiet_libraries()


def quiet_libraries() -> None:
    """Set the named libraries' loggers to their level too, so that their records are not
    even made (peewee would format every statement with its pickles)."""
    for name, level in LIBRARY_LEVELS.items():
        logging.getLogger(name).setLevel(level)


def redact(text: str) -> str:
    """`text` with every known secret (see `mask`) and token-shaped field masked."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    # The pattern's search costs more than this look, on every line of every job's output.
    return TOKEN_FIELD.sub(rf"\1{MASK}", text) if "access_token" in text else text


class Outage:
    """The log of a loop that retries a step: its first failure with the traceback, the
    failures after it only at debug (one line each, the exception in short), and the step
    working again. A lost database fails every try until it is back; one warning per
    outage says it without flooding. A failure `known` as trouble outside the service (a
    store in trouble) is said in one line, without a traceback: that stays for bugs."""

    def __init__(self, logger: logging.Logger, what: str,
                 known: Callable[[BaseException], bool] | None = None) -> None:
        self._log = logger
        self._what = what
        self._known = known
        self._down = False

    def failed(self, message: str, *args: object) -> None:
        """Call from an `except` block; `message` is said once per outage."""
        exc = sys.exception()
        if self._down:
            self._log.debug("%s failed again (%s); retrying", self._what, brief(exc))
        elif exc is not None and self._known is not None and self._known(exc):
            self._log.warning("%s (%s)", message % args, brief(exc))
        else:
            self._log.exception(message, *args)
        self._down = True

    def worked(self) -> None:
        if self._down:
            self._log.info("%s works again", self._what)
            self._down = False


def brief(exc: BaseException | None) -> str:
    """An exception in one line: 'OperationalError: database is locked'."""
    if exc is None:
        return "no exception"
    text = str(exc).strip().partition("\n")[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

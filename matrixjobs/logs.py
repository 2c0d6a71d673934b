"""Log lines for people and journald: `LEVEL logger: message` on stderr, secrets masked.

When stderr goes to journald (`$JOURNAL_STREAM` names it) each line starts with a syslog
priority such as `<4>`, which journald turns into the entry's priority (`journalctl -p
warning` works) and strips; journald stamps the time itself. Elsewhere lines carry their
own time stamp.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable

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
        text = super().format(record)
        for secret in _secrets:
            text = text.replace(secret, MASK)
        text = TOKEN_FIELD.sub(rf"\1{MASK}", text)
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


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(ServiceFormatter(journald=to_journal()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    quiet_libraries()


def quiet_libraries() -> None:
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # we log start/stop ourselves
    # nio logs every room event at INFO and whole responses (tokens, messages) at DEBUG.
    logging.getLogger("nio").setLevel(logging.WARNING)

"""Log lines: journald priorities under systemd, secrets never shown."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from matrixjobs.logs import (
    BackgroundHandler,
    Outage,
    ServiceFormatter,
    mask,
    service_handler,
    setup_logging,
    to_journal,
)


def record(level: int, message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("matrixjobs.queue", level, __file__, 1, message, args, None)


def test_under_journald_each_line_carries_its_syslog_priority():
    formatter = ServiceFormatter(journald=True)
    assert formatter.format(record(logging.WARNING, "job %s slow", "j7")) == (
        "<4>WARNING matrixjobs.queue: job j7 slow")
    assert formatter.format(record(logging.INFO, "x")).startswith("<6>INFO ")
    assert formatter.format(record(logging.ERROR, "x")).startswith("<3>ERROR ")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = record(logging.ERROR, "job %s crashed", "j8")
        failed.exc_info = sys.exc_info()
    lines = formatter.format(failed).splitlines()
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines)


def test_elsewhere_lines_are_time_stamped_without_a_priority():
    line = ServiceFormatter(journald=False).format(record(logging.INFO, "started"))
    assert not line.startswith("<") and line.endswith("INFO matrixjobs.queue: started")


def test_secrets_are_masked_wherever_they_appear():
    mask(["hunter2-password", None, "abc"])  # too short to mask safely: "abc" stays
    formatter = ServiceFormatter(journald=False)
    line = formatter.format(record(logging.ERROR, "login with %s failed (abc)",
                                   "hunter2-password"))
    assert "hunter2-password" not in line and "login with *** failed (abc)" in line


def test_token_fields_are_masked_even_when_the_token_is_not_known_yet():
    line = ServiceFormatter(journald=False).format(record(
        logging.DEBUG, "response %s", {"user_id": "@bot:x", "access_token": "syt_abc_123"}))
    assert "syt_abc_123" not in line and "'access_token': '***'" in line
    query = ServiceFormatter(journald=False).format(record(
        logging.DEBUG, "GET /sync?access_token=syt_xyz&since=s1"))
    assert "syt_xyz" not in query and "since=s1" in query


def test_journal_mode_only_when_stderr_is_the_stream_journal_stream_names(tmp_path,
                                                                          monkeypatch):
    import os

    with open(tmp_path / "log", "w") as stream:
        stat = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
        assert to_journal(stream.fileno())
        # A shell started from a service inherits the variable, with stderr elsewhere.
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino + 1}")
        assert not to_journal(stream.fileno())
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not to_journal(stream.fileno())


def handled(logger: str, level: int, message: str) -> list[str]:
    """What a service handler at DEBUG writes for one record of `logger`."""
    import io

    stream = io.StringIO()
    handler = service_handler(logging.StreamHandler(stream))
    record = logging.LogRecord(logger, level, __file__, 1, message, None, None)
    if handler.filter(record):
        handler.emit(record)
    return stream.getvalue().splitlines()


@pytest.mark.parametrize("logger", [
    "peewee", "aiosqlite", "nio.client.async_client", "nio.crypto.olm_machine", "mcp.server",
    "uvicorn.error", "httpx2", "some.library.imported.later",
])
def test_library_debug_and_info_lines_never_show_at_debug_level(logger):
    assert handled(logger, logging.DEBUG, "('INSERT INTO accounts', ['PICKLE'])") == []
    assert handled(logger, logging.INFO, "room event") == []
    assert handled(logger, logging.WARNING, "connection lost") != []


@pytest.mark.parametrize("logger", ["nio.events.misc", "nio.responses", "uvicorn.access"])
def test_libraries_that_quote_events_or_requests_are_never_shown(logger):
    assert handled(logger, logging.ERROR, "Error validating event: {'body': 'secret'}") == []


def test_our_own_debug_lines_show():
    assert handled("matrixjobs.queue", logging.DEBUG, "claimed j1") != []


def test_a_library_that_lowers_its_own_level_is_still_held_back():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    setup_logging("debug")
    try:
        logging.getLogger("peewee").setLevel(logging.DEBUG)  # as a library might
        handler = logging.getLogger().handlers[0]
        record = logging.LogRecord("peewee", logging.DEBUG, __file__, 1, "SQL", None, None)
        assert not handler.filter(record)
        assert logging.getLogger("nio").level == logging.WARNING
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


class Stuck(logging.Handler):
    """A target whose reader stalls until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release_reader = threading.Event()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.release_reader.wait(5)
        self.lines.append(record.getMessage())


def test_a_stalled_log_reader_costs_dropped_lines_said_later_not_a_blocked_caller():
    target = Stuck()
    handler = BackgroundHandler(target, backlog=5)
    logger = logging.getLogger("matrixjobs.test.stalled")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        started = time.monotonic()
        for n in range(50):
            logger.warning("line %d", n)
        assert time.monotonic() - started < 0.5
        assert 40 <= handler.dropped < 50
        target.release_reader.set()
        deadline = time.monotonic() + 5
        while handler.queue.qsize():  # the backlog goes out once the reader reads
            assert time.monotonic() < deadline
            time.sleep(0.01)
        logger.warning("after")
        handler.close()
        assert target.lines[-2].endswith("log lines were dropped: the log's reader was not "
                                         "keeping up")
        assert target.lines[-1] == "after"
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def test_an_outage_is_said_once_with_its_traceback_and_once_when_it_ends(caplog):
    outage = Outage(logging.getLogger("matrixjobs.test"), "store cycle")
    caplog.set_level(logging.DEBUG, logger="matrixjobs.test")
    for _ in range(3):
        try:
            raise OSError("database gone")
        except OSError:
            outage.failed("store cycle failed; retrying every %ds", 1)
    outage.worked()
    outage.worked()
    said = [(r.levelno, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    again = "store cycle failed again (OSError: database gone); retrying"
    assert said == [(logging.ERROR, "store cycle failed; retrying every 1s", True),
                    (logging.DEBUG, again, False),  # one line each, no traceback
                    (logging.DEBUG, again, False),
                    (logging.INFO, "store cycle works again", False)]


def test_an_outage_known_as_outside_trouble_is_said_in_one_line_a_bug_with_its_traceback(
        caplog):
    caplog.set_level(logging.INFO, logger="matrixjobs.test")
    outage = Outage(logging.getLogger("matrixjobs.test"), "store cycle",
                    known=lambda exc: isinstance(exc, OSError))
    for exc in (OSError("database gone"), KeyError("bug")):
        try:
            raise exc
        except Exception:
            outage.failed("store cycle failed; retrying every %ds", 1)
        outage.worked()
    said = [(r.levelno, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert said == [
        (logging.WARNING, "store cycle failed; retrying every 1s (OSError: database gone)",
         False),
        (logging.INFO, "store cycle works again", False),
        (logging.ERROR, "store cycle failed; retrying every 1s", True),
        (logging.INFO, "store cycle works again", False)]

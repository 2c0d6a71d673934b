"""The notify protocol's sender: never blocks the event loop, whatever its reader does."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time

from matrixjobs.systemd import Notifier


def unread_socket() -> tuple[socket.socket, str]:
    """A notify socket whose reader never reads (a hung PID 1)."""
    path = os.path.join(tempfile.mkdtemp(prefix="mjs"), "notify.sock")
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.bind(path)
    return reader, path


def test_a_reader_that_stops_reading_costs_dropped_messages_not_a_blocked_loop(caplog):
    reader, path = unread_socket()
    notifier = Notifier(path, watchdog_s=1.0)
    try:
        started = time.monotonic()
        for _ in range(200):  # the queue holds net.unix.max_dgram_qlen (10 here) datagrams
            notifier.notify("WATCHDOG=1")
        assert time.monotonic() - started < 1.0
        assert notifier.dropped >= 150
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "is not reading" in warnings[0].getMessage()
        notifier.close()
        assert f"{notifier.dropped} notify messages were dropped" in caplog.text
    finally:
        reader.close()


def test_what_the_reader_has_room_for_arrives(caplog):
    reader, path = unread_socket()
    notifier = Notifier(path, watchdog_s=None)
    try:
        notifier.notify("READY=1", "STATUS=ready")
        assert reader.recv(4096) == b"READY=1\nSTATUS=ready"
        assert notifier.dropped == 0 and caplog.records == []
    finally:
        notifier.close()
        reader.close()


def test_a_missing_socket_is_one_warning(caplog, tmp_path):
    notifier = Notifier(str(tmp_path / "gone.sock"), watchdog_s=None)
    notifier.notify("READY=1")
    notifier.notify("STATUS=x")
    assert len(caplog.records) == 1 and "cannot notify" in caplog.text
    notifier.close()

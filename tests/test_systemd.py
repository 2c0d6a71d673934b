"""The notify protocol's sender: never blocks the event loop, whatever its reader does."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator

import pytest

from matrixjobs.systemd import Notifier


@pytest.fixture
def unread_socket() -> Iterator[tuple[socket.socket, str]]:
    """A notify socket whose reader never reads (a hung PID 1), in a short-named
    directory (unix socket paths are short) that goes with it."""
    with tempfile.TemporaryDirectory(prefix="mjs") as directory:
        path = os.path.join(directory, "notify.sock")
        reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        reader.bind(path)
        try:
            yield reader, path
        finally:
            reader.close()


def test_a_reader_that_stops_reading_costs_dropped_messages_not_a_blocked_loop(
        caplog, unread_socket):
    _, path = unread_socket
    notifier = Notifier(path, watchdog_s=1.0)
    started = time.monotonic()
    for _ in range(200):  # the queue holds net.unix.max_dgram_qlen (10 here) datagrams
        notifier.notify("WATCHDOG=1")
    assert time.monotonic() - started < 1.0
    assert notifier.dropped >= 150
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "is not reading" in warnings[0].getMessage()
    notifier.close()
    assert f"{notifier.dropped} notify messages were dropped" in caplog.text


def test_what_the_reader_has_room_for_arrives(caplog, unread_socket):
    reader, path = unread_socket
    notifier = Notifier(path, watchdog_s=None)
    try:
        notifier.notify("READY=1", "STATUS=ready")
        assert reader.recv(4096) == b"READY=1\nSTATUS=ready"
        assert notifier.dropped == 0 and caplog.records == []
    finally:
        notifier.close()


def test_a_missing_socket_is_one_warning(caplog, tmp_path):
    notifier = Notifier(str(tmp_path / "gone.sock"), watchdog_s=None)
    notifier.notify("READY=1")
    notifier.notify("STATUS=x")
    assert len(caplog.records) == 1 and "cannot notify" in caplog.text
    notifier.close()

"""A SQLite store another process holds a write lock on (a `sqlite3` shell in a
transaction): the service waits for it, saying so once, and gives up in one line."""

from __future__ import annotations

import io
import os
import sqlite3
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from service_process import Service

from matrixjobs.ops.doctor import doctor
from matrixjobs.ops.report import Mark


def write_config(directory: Path, lock_wait_s: float) -> Path:
    config = directory / "config.toml"
    config.write_text(textwrap.dedent(f"""
        [store]
        path = "state/jobs.db"
        lock_wait_s = {lock_wait_s}
        [api]
        listen = "127.0.0.1:0"
        [targets.t]
        command = [{sys.executable!r}, "-c", "print('ok')"]
    """), encoding="utf-8")
    return config


def make_store(directory: Path) -> Path:
    """A store as the service leaves it, then unlocked."""
    service = Service(directory, write_config(directory, 30), log_name="first.log")
    service.wait_until_started()
    service.stop()
    return directory / "state" / "jobs.db"


def hold_write_lock(db: Path, seconds: float) -> threading.Thread:
    """What an operator's `sqlite3` shell does with BEGIN IMMEDIATE, for `seconds`."""
    taken = threading.Event()

    def hold() -> None:
        raw = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        raw.execute("BEGIN IMMEDIATE")
        taken.set()
        time.sleep(seconds)
        raw.execute("ROLLBACK")
        raw.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert taken.wait(10)
    return thread


@pytest.mark.timeout(60)
def test_a_store_locked_at_start_is_waited_for_saying_so_once(tmp_path):
    holder = hold_write_lock(make_store(tmp_path), 2.0)
    service = Service(tmp_path, write_config(tmp_path, 20))
    try:
        service.wait_until_started()
    finally:
        service.stop()
        holder.join()
    waits = [line for line in service.log.splitlines() if "locked by another process" in line]
    assert len(waits) == 1, service.log
    assert waits[0].endswith("locked by another process, waiting up to 20 s")
    assert "Traceback" not in service.log


@pytest.mark.timeout(60)
def test_a_store_locked_past_the_wait_ends_the_start_in_one_line(tmp_path):
    db = make_store(tmp_path)
    holder = hold_write_lock(db, 6.0)
    service = Service(tmp_path, write_config(tmp_path, 1))
    try:
        assert service.process.wait(20) == 1
    finally:
        service.stop()
        holder.join()
    assert "Traceback" not in service.log
    errors = [line for line in service.log.splitlines() if line.startswith("error:")]
    assert errors == [f"error: store {db} is locked by another process (waited 1 s; "
                      "[store] lock_wait_s)"], service.log


def test_doctor_names_the_process_that_holds_the_store_locked(tmp_path):
    db = make_store(tmp_path)
    holder = hold_write_lock(db, 3.0)
    try:
        report = doctor(tmp_path / "config.toml", environ={}, out=io.StringIO())
    finally:
        holder.join()
    locked = [f for f in report.findings if f.check == "store" and "locked" in f.text]
    assert len(locked) == 1 and locked[0].mark is Mark.WARN, report.findings
    assert locked[0].text.startswith(f"{db} is locked by another process (pid {os.getpid()})")
    assert not [f for f in doctor(tmp_path / "config.toml", environ={},
                                  out=io.StringIO()).findings if "locked" in f.text]

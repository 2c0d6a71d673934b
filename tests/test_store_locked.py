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
from fleet import answer as request
from fleet import free_port, wait_for
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


@pytest.mark.timeout(90)
def test_a_store_locked_while_running_is_busy_not_broken(tmp_path):
    """Writes wait out SQLite's busy timeout (5 s), then answer 503 store_unavailable with
    Retry-After, never 500; /healthz says degraded, then ok once the lock is gone."""
    db = make_store(tmp_path)
    port = free_port()
    config = write_config(tmp_path, 30).read_text().replace(
        'listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"')
    (tmp_path / "config.toml").write_text(config)
    service = Service(tmp_path, tmp_path / "config.toml")
    service.wait_until_started()
    try:
        holder = hold_write_lock(db, 9.0)
        code, headers, refused = request(port, "POST", "/v1/jobs", {"target": "t"})
        assert (code, refused["error"]["code"]) == (503, "store_unavailable"), refused
        assert refused["error"]["message"].startswith("store: locked")
        assert headers["Retry-After"] == "10"
        code, _, health = request(port, "GET", "/healthz")
        assert (code, health["status"], health["reason"]) == (503, "degraded", "store: locked")
        holder.join()
        wait_for(lambda: request(port, "GET", "/healthz")[0] == 200, 10, "healthy again")
        assert request(port, "POST", "/v1/jobs", {"target": "t"})[0] == 201
    finally:
        service.stop()
    assert "Traceback" not in service.log

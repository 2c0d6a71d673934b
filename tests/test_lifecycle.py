"""The service's life under a supervisor, with real processes: systemd's notify protocol,
graceful stop (jobs finish within the grace period or run again after a restart) and the
second signal that exits at once."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import sqlite3
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from containment import marked
from service_process import Service

pytestmark = pytest.mark.timeout(90)

# ::progress steps, each `STEP_S` apart; the pid of every run goes to runs.txt (its pid in
# its own PID namespace: the runs count, the numbers don't). The script's path, unique to a
# test, finds its processes from outside.
WORK = """
import os, sys, time
steps, step_s = int(sys.argv[1]), float(sys.argv[2])
with open("runs.txt", "a") as runs:
    runs.write(f"{os.getpid()}\\n")
with open("env.txt", "w") as env:
    env.write(os.environ.get("NOTIFY_SOCKET", "-"))
for step in range(1, steps + 1):
    time.sleep(step_s)
    print(f"::progress {step}/{steps} step {step}", flush=True)
"""


def write_config(directory: Path, steps: int, step_s: float, grace_s: float,
                 matrix: str = "", max_retries: int = 2) -> Path:
    (directory / "work.py").write_text(WORK)
    config = directory / "config.toml"
    config.write_text(textwrap.dedent(f"""
        [store]
        path = "state/jobs.db"
        [queue]
        shutdown_grace_s = {grace_s}
        kill_grace_s = 2
        [progress]
        interval_ms = 100
        [api]
        listen = "127.0.0.1:0"
        [targets.work]
        command = [{sys.executable!r}, {str(directory / "work.py")!r}, "{steps}", "{step_s}"]
        max_retries = {max_retries}
    """) + textwrap.dedent(matrix))
    return config


class NotifySocket:
    """What systemd listens on for a `Type=notify` service: collects the datagrams."""

    def __init__(self) -> None:
        # A short directory: unix socket paths are limited to 107 bytes.
        self.directory = tempfile.mkdtemp(prefix="mjn")
        self.path = os.path.join(self.directory, "notify.sock")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError, OSError):
                data = self.socket.recv(4096)
                self.messages.append((time.monotonic(), data.decode()))

    def fields(self) -> list[str]:
        return [field for _, message in self.messages for field in message.split("\n")]

    def wait_for(self, field: str, timeout: float = 20.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, message in self.messages:
                if field in message.split("\n"):
                    return at
            time.sleep(0.02)
        raise AssertionError(f"no {field!r} within {timeout}s; got {self.fields()}")

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.socket.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self.directory)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    listener = NotifySocket()
    yield listener
    listener.close()


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in started:
        service.stop()


def runs(directory: Path) -> list[int]:
    path = directory / "runs.txt"
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


def job_row(directory: Path) -> tuple[str, int, str | None]:
    db = directory / "state" / "jobs.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as raw:
        return raw.execute("SELECT status, retry_count, error FROM jobs").fetchone()


def submit(service: Service) -> None:
    """Queue the `work` target through the API the service logs it listens on."""
    import json
    import re
    import urllib.request

    service.wait_for_log("API listening on")
    [url] = re.findall(r"API listening on (http://\S+)", service.log)
    request = urllib.request.Request(f"{url}/v1/jobs", data=json.dumps({"target": "work"})
                                     .encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201


def wait_for(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return result


def start(directory: Path, services: list[Service], config: Path,
          env: dict[str, str] | None = None) -> Service:
    service = Service(directory, config, f"service{len(services)}.log", env)
    services.append(service)
    return service


# -- systemd's notify protocol ---------------------------------------------------------------


def test_ready_watchdog_and_stopping_reach_the_notify_socket(tmp_path, notify, services):
    config = write_config(tmp_path, steps=1, step_s=0.1, grace_s=5)
    service = start(tmp_path, services, config,
                    {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "300000"})
    notify.wait_for("READY=1")
    # READY comes once the store and API are up; the log line that says so is written by
    # the log's own thread, so it may reach the file a moment after READY.
    service.wait_for_log("matrixjobs started", timeout=5)
    submit(service)
    wait_for(lambda: job_row(tmp_path)[0] == "completed")
    # Pings every WATCHDOG_USEC/2 = 0.15 s: several arrive within a second.
    time.sleep(1.0)
    pings = [at for at, message in notify.messages if message == "WATCHDOG=1"]
    assert len(pings) >= 4, notify.fields()
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 0.3 * 3, gaps  # the watchdog (0.3 s) would have fired much later

    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(10) == 0, service.log
    stopping = [m for _, m in notify.messages if "STOPPING=1" in m.split("\n")]
    assert stopping, notify.fields()
    # The stop may take the configured grace: systemd is told so.
    extend = [f for f in stopping[0].split("\n") if f.startswith("EXTEND_TIMEOUT_USEC=")]
    assert extend and int(extend[0].split("=")[1]) >= 5_000_000
    # Job subprocesses don't inherit the notify socket (they could speak for the service).
    assert (tmp_path / "env.txt").read_text() == "-"


def test_no_notify_socket_no_messages_and_a_normal_run(tmp_path, services):
    config = write_config(tmp_path, steps=1, step_s=0.1, grace_s=5)
    service = start(tmp_path, services, config)
    service.wait_until_started()
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(10) == 0, service.log
    assert "systemd" not in service.log


def test_ready_waits_for_the_matrix_bot(tmp_path, notify, services):
    """With the homeserver down, the API serves but READY=1 is held back (up to a bound,
    see daemon.READY_WAIT_S) and a stop still works."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens there once closed
    config = write_config(tmp_path, steps=1, step_s=0.1, grace_s=5, matrix=f"""
        [matrix]
        homeserver = "http://127.0.0.1:{port}"
        user_id = "@bot:localhost"
    """)
    service = start(tmp_path, services, config,
                    {"NOTIFY_SOCKET": notify.path, "MATRIXJOBS_PASSWORD": "secret-password"})
    service.wait_until_started()
    submit(service)  # the API works meanwhile
    wait_for(lambda: job_row(tmp_path)[0] == "completed")
    assert "READY=1" not in notify.fields()
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(10) == 0, service.log
    assert "READY=1" not in notify.fields()
    assert "STOPPING=1" in notify.fields()
    assert "secret-password" not in service.log


# -- graceful stop -------------------------------------------------------------------------------


def test_sigterm_lets_a_running_job_finish_within_the_grace_period(tmp_path, services):
    config = write_config(tmp_path, steps=10, step_s=0.2, grace_s=20)
    service = start(tmp_path, services, config)
    submit(service)
    wait_for(lambda: runs(tmp_path))
    began = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(20) == 0, service.log
    assert time.monotonic() - began < 10
    assert job_row(tmp_path)[0] == "completed"
    assert len(runs(tmp_path)) == 1
    assert "running jobs get up to 20s to finish" in service.log


def test_sigterm_past_the_grace_period_requeues_and_the_restart_runs_it(tmp_path, services):
    config = write_config(tmp_path, steps=20, step_s=0.2, grace_s=0.5)
    service = start(tmp_path, services, config)
    submit(service)
    wait_for(lambda: runs(tmp_path))
    began = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(20) == 0, service.log
    assert time.monotonic() - began < 0.5 + 2 + 3  # grace + kill grace + slack
    assert len(runs(tmp_path)) == 1
    assert not marked(str(tmp_path / "work.py"))
    status, retries, error = job_row(tmp_path)
    assert (status, retries) == ("pending", 0)  # a stop costs no retry
    assert "service stopped" in error

    service = start(tmp_path, services, config)
    wait_for(lambda: job_row(tmp_path)[0] == "completed")
    assert len(runs(tmp_path)) == 2
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(10) == 0


def test_a_second_signal_kills_the_jobs_and_exits_at_once(tmp_path, services):
    # No retries: a job stopped with the service must not count as having crashed it.
    config = write_config(tmp_path, steps=100, step_s=0.2, grace_s=60, max_retries=0)
    service = start(tmp_path, services, config)
    submit(service)
    wait_for(lambda: runs(tmp_path))
    service.process.send_signal(signal.SIGTERM)
    service.wait_for_log("shutting down")
    began = time.monotonic()
    service.process.send_signal(signal.SIGINT)
    assert service.process.wait(10) == 1
    assert time.monotonic() - began < 2
    assert len(runs(tmp_path)) == 1
    wait_for(lambda: not marked(str(tmp_path / "work.py")), timeout=5)
    db = tmp_path / "state" / "jobs.db"
    with contextlib.closing(sqlite3.connect(db)) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert job_row(tmp_path)[0] == "processing"  # as after a crash: recovered at start

    service = start(tmp_path, services, config)
    wait_for(lambda: len(runs(tmp_path)) == 2)  # runs again after the restart
    assert job_row(tmp_path)[:2] == ("processing", 0)  # without spending a retry
    service.process.send_signal(signal.SIGTERM)
    service.wait_for_log("shutting down")  # two signals at once would merge into one
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(10) == 1


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_notify_socket_nobody_reads_never_freezes_the_service(tmp_path, services):
    """A hung PID 1 stops reading: its datagram queue fills after ten messages. The service
    must keep answering and still stop on SIGTERM."""
    directory = tempfile.mkdtemp(prefix="mjn")
    path = os.path.join(directory, "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unread:
        unread.bind(path)
        config = write_config(tmp_path, steps=1, step_s=0.1, grace_s=5)
        service = start(tmp_path, services, config,
                        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
        service.wait_until_started()
        time.sleep(60)  # 120 watchdog pings, 110 of them with nowhere to go
        started = time.monotonic()
        submit(service)
        assert time.monotonic() - started < 1.0
        wait_for(lambda: job_row(tmp_path)[0] == "completed", timeout=10)
        started = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(5) == 0, service.log
        assert time.monotonic() - started < 5
        assert "is not reading" in service.log and "notify messages were dropped" in service.log
    os.unlink(path)
    os.rmdir(directory)

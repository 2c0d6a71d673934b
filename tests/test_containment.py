"""Contained jobs, tried from outside on a real `matrixjobs run`: nothing a job starts
outlives it (cancel, timeout, a failed attempt, stop, SIGKILL of the service), a crash
never leaves two copies running, jobs cannot read the service's secrets, and limits hold.
As root (how CI runs) and as `nobody` (how the systemd unit runs)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from containment import (
    escaping_script,
    gone_within,
    kill_marked,
    marked,
    needs_bwrap,
    new_marker,
    nobody_dir,
    nobody_python,
    nobody_uid,
    wait_marked,
)
from fleet import api, free_port, wait_for
from helpers import make_config
from service_process import Service

from matrixjobs.config import LimitsConfig, toml_list, toml_string
from matrixjobs.queue.cgroups import detect
from matrixjobs.queue.runner import Launch
from matrixjobs.queue.sandbox import sandbox_runner

KILL_GRACE_S = 1.0
SHUTDOWN_GRACE_S = 1.0
SECRET_VALUE = "api-token-nobody-may-read-0123456789"


@dataclass
class Place:
    """Where a service runs: its directory, how to start Python there, as whom."""

    directory: Path
    who: str
    python: list[str] | None = None
    env: dict[str, str] | None = None


@pytest.fixture(autouse=True)
def bubblewrap() -> None:
    needs_bwrap()


@pytest.fixture(params=["root", "nobody"])
def place(request, tmp_path) -> Iterator[Place]:
    if request.param == "root":
        if os.geteuid() != 0:
            pytest.skip("the root variant needs root")
        yield Place(tmp_path, "root")
        return
    python, env = nobody_python()
    for directory in nobody_dir():
        yield Place(directory, "nobody", python, env)


@pytest.fixture
def marker() -> Iterator[str]:
    found = new_marker()
    yield found
    kill_marked(found)


def write_config(place: Place, port: int, targets: dict[str, dict[str, Any]],
                 **queue: Any) -> Path:
    """The store in a directory of its own (as StateDirectory= gives it), targets run in
    `place.directory`."""
    queue = {"kill_grace_s": KILL_GRACE_S, "shutdown_grace_s": SHUTDOWN_GRACE_S,
             "retry_backoff_s": 60, "max_retries": 0, **queue}
    lines = ["[store]", 'path = "state/jobs.db"', "[queue]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in queue.items()]
    lines += ["[progress]", "interval_ms = 50", "[api]", f'listen = "127.0.0.1:{port}"']
    for name, spec in targets.items():
        lines.append(f"[targets.{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in spec.items()]
    config = place.directory / "config.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (place.directory / "state").mkdir(exist_ok=True)
    if place.who == "nobody":
        for path in (config, place.directory / "state"):
            os.chown(path, nobody_uid(), -1)
    return config


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return toml_list(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return str(value)


def start(place: Place, config: Path, env: dict[str, str] | None = None) -> Service:
    python = None
    if place.who == "nobody":
        python = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
                  *(place.python or [])]
    service = Service(place.directory, config, env={**(place.env or {}), **(env or {})},
                      python=python)
    service.wait_until_started()
    return service


def shell(script: str, **extra: Any) -> dict[str, Any]:
    return {"command": ["sh", "-c", script], **extra}


def job(port: int, job_id: str) -> dict[str, Any]:
    return api(port, "GET", f"/v1/jobs/{job_id}")


@pytest.mark.timeout(60)
def test_a_cancel_ends_every_process_of_the_job_within_the_grace(place, marker):
    port = free_port()
    config = write_config(place, port, {"escape": shell(escaping_script(marker))})
    service = start(place, config)
    try:
        submitted = api(port, "POST", "/v1/jobs", {"target": "escape"})
        wait_marked(marker, 5, 10)
        asked = time.monotonic()
        cancelled = api(port, "POST", f"/v1/jobs/{submitted['id']}/cancel")
        left = gone_within(marker, KILL_GRACE_S + 1 - (time.monotonic() - asked))
    finally:
        service.stop()
    assert cancelled["status"] == "cancelled"
    assert left >= 0


@pytest.mark.timeout(60)
def test_a_timeout_ends_every_process_of_the_job(tmp_path, marker):
    place = Place(tmp_path, "root")
    port = free_port()
    config = write_config(place, port, {"escape": shell(escaping_script(marker),
                                                        timeout_s=1)})
    service = start(place, config)
    try:
        submitted = api(port, "POST", "/v1/jobs", {"target": "escape"})
        wait_marked(marker, 5, 10)
        seen = time.monotonic()
        gone_within(marker, 1 + KILL_GRACE_S + 1)
        took = time.monotonic() - seen
        final = wait_for(lambda: (j := job(port, submitted["id"]))["status"] == "failed" and j,
                         10, "the job failed")
    finally:
        service.stop()
    assert "timed out after 1s" in final["error"]
    assert took <= 1 + KILL_GRACE_S + 1


@pytest.mark.timeout(60)
def test_a_failed_attempt_leaves_nothing_running_before_its_retry(tmp_path, marker):
    place = Place(tmp_path, "root")
    port = free_port()
    config = write_config(place, port, {"escape": shell(escaping_script(marker, exit_code=3),
                                                        max_retries=1)})
    service = start(place, config)
    try:
        submitted = api(port, "POST", "/v1/jobs", {"target": "escape"})
        failed = wait_for(lambda: (j := job(port, submitted["id"])).get("error") and j, 10,
                          "the first attempt's end")
        gone_within(marker, 1)
    finally:
        service.stop()
    assert failed["status"] == "pending"  # its retry waits retry_backoff_s
    assert failed["error"].startswith("exit code 3")


@pytest.mark.timeout(60)
def test_a_stopped_service_leaves_nothing_after_its_graces(tmp_path, marker):
    place = Place(tmp_path, "root")
    port = free_port()
    config = write_config(place, port, {"escape": shell(escaping_script(marker))})
    service = start(place, config)
    try:
        api(port, "POST", "/v1/jobs", {"target": "escape"})
        wait_marked(marker, 5, 10)
        asked = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        gone_within(marker, SHUTDOWN_GRACE_S + KILL_GRACE_S + 1)
        took = time.monotonic() - asked
        assert service.process.wait(20) == 0
    finally:
        service.stop()
    assert took <= SHUTDOWN_GRACE_S + KILL_GRACE_S + 1


@pytest.mark.timeout(60)
def test_a_service_killed_by_sigkill_takes_every_job_process_within_a_second(place, marker):
    port = free_port()
    config = write_config(place, port, {"escape": shell(escaping_script(marker))})
    service = start(place, config)
    try:
        api(port, "POST", "/v1/jobs", {"target": "escape"})
        wait_marked(marker, 5, 10)
        service.process.send_signal(signal.SIGKILL)
        took = gone_within(marker, 1.0)
    finally:
        service.stop()
    assert took <= 1.0


@pytest.mark.timeout(90)
def test_after_a_crash_the_recovered_attempt_is_the_only_copy_running(tmp_path, marker):
    place = Place(tmp_path, "root")
    port = free_port()
    work = f"echo start; sleep {marker}; echo done"
    config = write_config(place, port, {"deploy": shell(work, max_retries=1)}, lease_s=2)
    service = start(place, config)
    try:
        submitted = api(port, "POST", "/v1/jobs", {"target": "deploy"})
        wait_marked(marker, 2, 10)  # sh and its sleep
        service.process.send_signal(signal.SIGKILL)
        service.process.wait(10)
        gone_within(marker, 1.0)  # before anything could start it again
    finally:
        service.stop()
    service = start(place, config)
    try:
        wait_for(lambda: job(port, submitted["id"])["status"] == "processing"
                 and len(marked(marker)) >= 2, 20, "the recovered attempt")
        time.sleep(0.5)
        sleeps = [pid for pid in marked(marker)
                  if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep\0")]
        state = job(port, submitted["id"])
    finally:
        service.stop()
    assert len(sleeps) == 1, sleeps
    assert state["jobDetails"]["retryCount"] == 1


# -- secrets ----------------------------------------------------------------------------------

# Whether each file opens, and as which file (device:inode): a masked one is /dev/null.
READ_EACH = """
for f in "$@"; do
  if cat "$f" > /dev/null 2>&1; then echo "READ $f $(stat -Lc %d:%i "$f")"; \
  else echo "HIDDEN $f"; fi
done
"""


def identity(path: Path) -> str:
    found = path.stat()
    return f"{found.st_dev}:{found.st_ino}"


@pytest.mark.parametrize("layout", ["state directory", "one directory", "shared state"])
@pytest.mark.timeout(60)
def test_a_job_cannot_read_the_services_secrets(place, layout):
    """'state directory': the store in a directory of its own (StateDirectory=) is hidden
    whole; 'one directory': store, config and job share one, and each secret file is;
    'shared state': the store's directory holds other files too (a home directory's
    caches), which jobs keep seeing, and each secret file is masked."""
    port = free_port()
    directory = place.directory
    state = directory if layout == "one directory" else directory / "state"
    store = state / "jobs.db"
    secrets = [store, Path(f"{store}-wal"), Path(f"{store}-shm"), Path(f"{store}.lock"),
               state / "jobs.pickle-key", state / "jobs-crypto" / "matrixjobs.db",
               directory / ".env", directory / "config.toml"]
    # The job's own file: readable, so the check can fail.
    mine = state / ".cache" / "mine.txt" if layout == "shared state" else directory / "mine.txt"
    files = [str(p) for p in [*secrets, mine]]
    config = write_config(place, port, {"peek": {
        "command": ["sh", "-c", READ_EACH + 'cat "/proc/$(cat service.pid)/environ" '
                    '> /dev/null 2>&1 && echo "READ environ" || echo "HIDDEN environ"',
                    "peek", *files]}})
    if layout == "one directory":
        text = config.read_text().replace('path = "state/jobs.db"', 'path = "jobs.db"')
        config.write_text(text)
    (state / "jobs-crypto").mkdir(parents=True, exist_ok=True)
    (state / "jobs-crypto" / "matrixjobs.db").write_text("olm account")
    (state / "jobs.pickle-key").write_text("pickle key")
    (directory / ".env").write_text(f"MATRIXJOBS_API_TOKEN={SECRET_VALUE}\n")
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_text("the job's own")
    if place.who == "nobody":
        for path in [*state.rglob("*"), directory / ".env"]:
            os.chown(path, nobody_uid(), -1)
    service = start(place, config)
    try:
        (directory / "service.pid").write_text(str(service.process.pid))
        headers_token = SECRET_VALUE
        submitted = api_with(port, headers_token, "POST", "/v1/jobs", {"target": "peek"})
        wait_for(lambda: api_with(port, headers_token, "GET",
                                  f"/v1/jobs/{submitted['id']}")["status"] == "completed",
                 20, "the job's end")
        lines = log_lines(port, headers_token, submitted["id"])
    finally:
        service.stop()
    assert f"READ {mine} {identity(mine)}" in lines, lines  # the job's own, as it is
    for secret in secrets:
        assert secret.exists(), secret  # (and so the job's view of it means something)
        assert f"READ {secret} {identity(secret)}" not in lines, lines
    assert "HIDDEN environ" in lines, lines


def api_with(port: int, token: str, method: str, path: str,
             body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def log_lines(port: int, token: str | None, job_id: str) -> list[str]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/jobs/{job_id}/log",
        headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode().splitlines()


# -- network and limits ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_without_network_a_job_cannot_reach_the_services_api(tmp_path):
    place = Place(tmp_path, "root")
    port = free_port()
    connect = ("import socket, sys\n"
               "try:\n"
               f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
               "    print('CONNECTED')\n"
               "except OSError as exc:\n"
               "    print('REFUSED', exc)\n")
    config = write_config(place, port, {
        "offline": {"command": [sys.executable, "-c", connect], "network": False},
        "online": {"command": [sys.executable, "-c", connect]}})
    assert connections(place, config, port) == {"offline": "REFUSED", "online": "CONNECTED"}


@pytest.mark.timeout(60)
def test_without_network_a_job_cannot_reach_the_api_on_its_unix_socket(tmp_path):
    place = Place(tmp_path, "root")
    sock = tmp_path / "api.sock"
    connect = ("import socket\n"
               "s = socket.socket(socket.AF_UNIX)\n"
               "try:\n"
               f"    s.connect({str(sock)!r})\n"
               "    print('CONNECTED')\n"
               "except OSError as exc:\n"
               "    print('REFUSED', exc)\n")
    config = write_config(place, 0, {
        "offline": {"command": [sys.executable, "-c", connect], "network": False},
        "online": {"command": [sys.executable, "-c", connect]}})
    config.write_text(config.read_text().replace('listen = "127.0.0.1:0"',
                                                 f'listen = "unix:{sock}"'))
    assert connections(place, config, None, sock) == {"offline": "REFUSED",
                                                      "online": "CONNECTED"}


def connections(place: Place, config: Path, port: int | None,
                sock: Path | None = None) -> dict[str, str]:
    """What the offline and online targets' connection attempts said."""
    service = start(place, config)
    try:
        said = {}
        for target in ("offline", "online"):
            submitted = over(port, sock, "POST", "/v1/jobs", {"target": target})
            path = f"/v1/jobs/{submitted['id']}"
            wait_for(lambda p=path: over(port, sock, "GET", p)["status"] == "completed",
                     20, "the end")
            log = over(port, sock, "GET", path + "/log", raw=True)
            said[target] = next(word for word in ("REFUSED", "CONNECTED") if word in log)
    finally:
        service.stop()
    return said


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(self.path))


def over(port: int | None, sock: Path | None, method: str, path: str,
         body: dict[str, Any] | None = None, raw: bool = False) -> Any:
    """The API over TCP or its unix socket."""
    connection = (UnixConnection(sock) if sock is not None
                  else http.client.HTTPConnection("127.0.0.1", port, timeout=30))
    try:
        connection.request(method, path, body=None if body is None else json.dumps(body),
                           headers={"Content-Type": "application/json"})
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    return text if raw else json.loads(text)


ALLOCATE_3_GIB = "b = bytearray(3 * 1024**3); print('allocated', len(b))"


def failure(place: Place, target: dict[str, Any]) -> str:
    """The error of a job of `target` run to its end (it must fail)."""
    port = free_port()
    service = start(place, write_config(place, port, {"t": target}))
    try:
        submitted = api(port, "POST", "/v1/jobs", {"target": "t"})
        final = wait_for(lambda: (j := job(port, submitted["id"]))["status"] == "failed" and j,
                         30, "the job failed")
    finally:
        service.stop()
    return final["error"]


@pytest.mark.timeout(60)
def test_a_job_over_its_memory_limit_fails_saying_so(place):
    python = (place.python or [sys.executable])[0]
    error = failure(place, {"command": [python, "-c", ALLOCATE_3_GIB],
                            "limits": {"memory": "256M"}})
    assert error.startswith("stopped: over its memory limit of 256 MiB"), error


@pytest.mark.parametrize(("limits", "work", "reason"), [
    ({"cpu_s": 1}, "while True: pass",
     "stopped: over its CPU time limit of 1 s"),
    ({"file_size": "1M"}, "open('big', 'wb').write(bytes(2 * 1024 * 1024))",
     "stopped: wrote a file over its file size limit of 1 MiB"),
])
@pytest.mark.timeout(60)
def test_a_job_over_its_cpu_or_file_size_limit_fails_saying_so(tmp_path, limits, work, reason):
    error = failure(Place(tmp_path, "root"),
                    {"command": [sys.executable, "-c", work], "limits": limits})
    assert error.startswith(reason), error


def fork_bomb(marker: str) -> str:
    """The classic one: every process starts two more, for ever."""
    return f"b() {{ sleep {marker} & b | b & }}; b; sleep {marker}"


@pytest.mark.timeout(60)
def test_a_fork_bomb_under_a_process_limit_ends_failed_and_the_service_answers(place, marker):
    port = free_port()
    config = write_config(place, port, {"bomb": shell(fork_bomb(marker),
                                                      limits={"processes": 64})})
    service = start(place, config)
    try:
        submitted = api(port, "POST", "/v1/jobs", {"target": "bomb"})
        began = time.monotonic()
        slowest = 0.0
        while job(port, submitted["id"])["status"] in ("pending", "processing"):
            asked = time.monotonic()
            api(port, "GET", "/v1/status")
            slowest = max(slowest, time.monotonic() - asked)
            assert time.monotonic() - began < 10, "the fork bomb still runs after 10 s"
            time.sleep(0.1)
        final = job(port, submitted["id"])
        gone_within(marker, 2)
    finally:
        service.stop()
    assert final["status"] == "failed"
    assert final["error"].startswith("stopped: more than 64 processes"), final["error"]
    assert slowest < 1.0


@pytest.mark.timeout(60)
def test_a_limit_this_host_cannot_enforce_is_an_error_at_start(tmp_path):
    """Process groups cannot hold a job to a number of processes."""
    place = Place(tmp_path, "root")
    config = write_config(place, free_port(), {"bomb": shell("true",
                                                             limits={"processes": 64})},
                          containment="none")
    service = Service(tmp_path, config)
    try:
        assert service.process.wait(20) == 1
    finally:
        service.stop()
    assert "targets.bomb.limits.processes: nothing on this host enforces it" in service.log
    assert "Traceback" not in service.log


@pytest.mark.timeout(60)
def test_without_containment_the_service_says_so_loudly_and_still_runs_jobs(tmp_path, marker):
    place = Place(tmp_path, "root")
    port = free_port()
    config = write_config(place, port, {"work": shell(f"sleep 0.{marker[-3:]}; echo ok")},
                          containment="none")
    service = start(place, config)
    try:
        submitted = api(port, "POST", "/v1/jobs", {"target": "work"})
        wait_for(lambda: job(port, submitted["id"])["status"] == "completed", 20, "its end")
    finally:
        service.stop()
    assert "WARNING" in service.log and "jobs are NOT contained" in service.log
    assert "process groups only" in service.log


REFUSING_BWRAP = """#!/bin/sh
echo "bwrap: No permissions to create new namespace, likely because the kernel does not \
allow non-privileged user namespaces." >&2
exit 1
"""


@pytest.mark.parametrize("containment", ["auto", "bubblewrap"])
@pytest.mark.timeout(60)
def test_a_host_that_refuses_the_sandbox_is_said_loudly_or_refused(tmp_path, containment):
    """"auto" falls back to process groups with a WARNING naming bubblewrap's words;
    "bubblewrap" refuses to start with them, in one line."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "bwrap").write_text(REFUSING_BWRAP)
    (fake / "bwrap").chmod(0o755)
    place = Place(tmp_path, "root")
    port = free_port()
    config = write_config(place, port, {"work": shell("echo ok")}, containment=containment)
    env = {"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    if containment == "bubblewrap":
        service = Service(tmp_path, config, env=env)
        try:
            assert service.process.wait(20) == 1
        finally:
            service.stop()
        assert ('queue.containment = "bubblewrap": bubblewrap cannot start a sandbox here: '
                "bwrap: No permissions to create new namespace") in service.log
        assert "Traceback" not in service.log
        return
    service = start(place, config, env=env)
    try:
        submitted = api(port, "POST", "/v1/jobs", {"target": "work"})
        wait_for(lambda: job(port, submitted["id"])["status"] == "completed", 20, "its end")
    finally:
        service.stop()
    assert "WARNING" in service.log and "jobs are NOT contained" in service.log
    assert "bwrap: No permissions to create new namespace" in service.log


# -- found in review ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_job_cannot_make_user_namespaces_of_its_own(tmp_path):
    """In one it would hold every capability: a root service's job could mount cgroupfs
    anew and raise its own memory and process limits (review 16)."""
    error = failure(Place(tmp_path, "root"), shell(
        "unshare --user --map-root-user --mount true && echo NESTED || exit 3",
        limits={"memory": "256M", "processes": 64}))
    assert error.startswith("exit code 3"), error


PG_SOCKET = Path("/var/run/postgresql/.s.PGSQL.5432")


@pytest.mark.skipif(not PG_SOCKET.exists(), reason="no local PostgreSQL socket here")
@pytest.mark.timeout(60)
def test_without_network_a_job_cannot_reach_a_local_database_on_its_unix_socket(tmp_path):
    """A unix socket is a file, not the network: /run is hidden from offline jobs."""
    connect = ("import socket\n"
               "s = socket.socket(socket.AF_UNIX)\n"
               f"s.connect({str(PG_SOCKET)!r})\n")
    error = failure(Place(tmp_path, "root"), {"command": [sys.executable, "-c", connect],
                                              "network": False})
    assert "No such file or directory" in error, error


@pytest.mark.timeout(60)
def test_a_symlinked_store_keeps_its_wal_and_shm_hidden(tmp_path):
    """SQLite keeps -wal and -shm beside the file a symlinked store path points to."""
    place = Place(tmp_path, "root")
    real = tmp_path / "elsewhere"
    real.mkdir()
    port = free_port()
    config = write_config(place, port, {"peek": {"command": [
        "sh", "-c", READ_EACH, "peek",
        *(str(real / f"jobs.db{end}") for end in ("", "-wal", "-shm"))]}})
    config.write_text(config.read_text().replace('path = "state/jobs.db"',
                                                 'path = "state/link.db"'))
    (tmp_path / "state" / "link.db").symlink_to(real / "jobs.db")
    service = start(place, config)
    try:
        submitted = api(port, "POST", "/v1/jobs", {"target": "peek"})
        wait_for(lambda: job(port, submitted["id"])["status"] == "completed", 20, "its end")
        lines = log_lines(port, None, submitted["id"])
    finally:
        service.stop()
    for end in ("", "-wal", "-shm"):
        secret = real / f"jobs.db{end}"
        assert secret.exists()
        assert f"READ {secret} {identity(secret)}" not in lines, lines


@pytest.fixture
def as_nobody() -> Iterator[Place]:
    python, env = nobody_python()
    for directory in nobody_dir():
        yield Place(directory, "nobody", python, env)


@pytest.mark.timeout(60)
def test_a_healthy_job_that_says_cannot_fork_is_not_stopped_for_it(as_nobody):
    """Words alone prove nothing: only a job near its process limit is stopped for them."""
    port = free_port()
    config = write_config(as_nobody, port, {"t": shell(
        "echo 'sh: 0: Cannot fork'; sleep 0.6; echo still fine", limits={"processes": 64})})
    service = start(as_nobody, config)
    try:
        submitted = api(port, "POST", "/v1/jobs", {"target": "t"})
        final = wait_for(lambda: (j := job(port, submitted["id"]))["status"]
                         in ("completed", "failed") and j, 20, "its end")
    finally:
        service.stop()
    assert final["status"] == "completed", final.get("error")


@pytest.mark.timeout(60)
def test_a_working_directory_under_tmp_or_linked_into_it_still_works(tmp_path):
    place = Place(tmp_path, "root")
    under_tmp = Path(tempfile.mkdtemp(prefix="matrixjobs-cwd-", dir="/tmp"))
    try:
        (tmp_path / "link").symlink_to(under_tmp)
        port = free_port()
        config = write_config(place, port, {
            "linked": shell("pwd; echo here > made.txt", cwd=str(tmp_path / "link")),
            "tmp": shell("echo fine", cwd="/tmp")})
        service = start(place, config)
        try:
            ids = [api(port, "POST", "/v1/jobs", {"target": t})["id"] for t in ("linked", "tmp")]
            for job_id in ids:
                final = wait_for(lambda j=job_id: (found := job(port, j))["status"]
                                 in ("completed", "failed") and found, 20, "its end")
                assert final["status"] == "completed", final.get("error")
        finally:
            service.stop()
        assert (under_tmp / "made.txt").read_text() == "here\n"
    finally:
        shutil.rmtree(under_tmp, ignore_errors=True)


@pytest.mark.timeout(60)
def test_a_sandbox_that_cannot_start_the_program_says_so(tmp_path):
    """A program inside the hidden crypto store: bubblewrap's own words, not 'exit 1'."""
    place = Place(tmp_path, "root")
    tool = tmp_path / "state" / "jobs-crypto" / "tool.sh"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\necho hi\n")
    tool.chmod(0o755)
    error = failure(place, {"command": [str(tool)]})
    assert error.startswith("the sandbox could not start: execvp"), error


@pytest.mark.skipif(os.geteuid() != 0, reason="choosing the next pid (ns_last_pid) needs root")
async def test_ending_a_job_never_signals_a_process_that_took_its_pid(tmp_path):
    """Once bubblewrap is reaped its pid may be another process's: kill() must not reach
    it (review 16 forced the reuse with ns_last_pid)."""
    runner = sandbox_runner(make_config(tmp_path))[0]
    assert runner is not None
    launch = Launch(argv=["/bin/true"], cwd=tmp_path, env=dict(os.environ), job_id="j1",
                    limits=LimitsConfig())
    started = await runner.spawn(launch)
    await started.exited()
    pid = started.pid
    Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
    victim = subprocess.Popen(["sleep", "30"])
    try:
        if victim.pid != pid:
            pytest.skip("another process took the pid first")
        started.kill()
        await started.close()
        time.sleep(0.2)
        assert victim.poll() is None, "the process that reused the pid was killed"
    finally:
        victim.kill()
        victim.wait()


# Still open (review 16): the reproductions fail while the defect is there.


PTRACE_SCOPE = Path("/proc/sys/kernel/yama/ptrace_scope")
needs_ptrace = pytest.mark.skipif(
    os.uname().machine != "x86_64"
    or (PTRACE_SCOPE.exists() and PTRACE_SCOPE.read_text().strip() != "0"),
    reason="the injection is x86_64; Yama ptrace_scope >= 1 forbids it")


def untied_job_survives_sigkill(place: Place, marker: str) -> tuple[Path, int]:
    """A job that ptraces its sandbox's init to clear its parent-death signal (review 16),
    then a SIGKILL of the service; (the config, the port)."""
    directory = place.directory
    shutil.copy(Path(__file__).resolve().parent / "unpdeath.py", directory / "unpdeath.py")
    port = free_port()
    work = (f"{sys.executable} {directory / 'unpdeath.py'} && touch injected && "
            f"setsid sleep {marker} & sleep {marker}")
    config = write_config(place, port, {"t": shell(work, max_retries=1)})
    service = start(place, config)
    try:
        api(port, "POST", "/v1/jobs", {"target": "t"})
        wait_for(lambda: (directory / "injected").exists(), 20, "the injection done")
        wait_marked(marker, 2, 10)
        service.process.kill()
        service.process.wait(10)
        time.sleep(1.0)
    finally:
        service.stop()
    if not marked(marker):
        # Seen on a kernel without Yama (6.18): the init's prctl took, yet the job died with
        # the service. Nothing outlived it, so there is neither a defect to show nor a
        # leftover for the next start to end.
        pytest.skip(f"the untied job did not outlive the service on this host "
                    f"(kernel {os.uname().release})")
    return config, port


@needs_ptrace
@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "a job may ptrace bubblewrap's init (same uid, same user namespace, dumpable) and clear "
    "its parent-death signal: after a SIGKILL of the service the job runs on until the next "
    "start's sweep of job cgroups (where there are cgroups); Yama ptrace_scope >= 1 or the "
    "unit's SystemCallFilter close it"))
@pytest.mark.timeout(60)
def test_a_job_cannot_untie_its_init_from_the_service(tmp_path, marker):
    untied_job_survives_sigkill(Place(tmp_path, "root"), marker)
    left = marked(marker)
    assert not left, f"{len(left)} processes of the job still run after a SIGKILL"


@needs_ptrace
@pytest.mark.skipif(detect(enable=False) is None, reason="no cgroup this user may make")
@pytest.mark.timeout(60)
def test_what_an_untied_job_left_is_ended_at_the_next_start_before_recovery(tmp_path, marker):
    place = Place(tmp_path, "root")
    config, _ = untied_job_survives_sigkill(place, marker)
    survivors = set(marked(marker))
    assert survivors  # it did survive the SIGKILL
    service = start(place, config)  # recovery runs the job again: new processes, same marker
    try:
        # The sweep ran before recovery, so by "started" the old copy is gone.
        assert not survivors & set(marked(marker)), "the old copy runs beside the new one"
    finally:
        service.stop()


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "bubblewrap exits 128+N when the job is killed by signal N, so a job exiting 129..192 "
    "itself reads as killed by a signal"))
@pytest.mark.timeout(60)
def test_a_job_that_exits_137_is_not_said_to_be_killed(tmp_path):
    error = failure(Place(tmp_path, "root"), shell("exit 137"))
    assert error.startswith("exit code 137"), error

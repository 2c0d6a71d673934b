"""Nothing of ours blocks the service's event loop: a real `matrixjobs run` reads a job's
50 MB of output while `/healthz` keeps answering within a second, asyncio's debug mode
sees no callback run for a second or more, and the service's memory stays flat."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from service_process import Service

pytestmark = pytest.mark.timeout(120)

OUTPUT_MB = 50
BLOCKED_S = 1.0  # the longest any one callback may hold the loop
PROBE_EVERY_S = 0.1
JOB_TIMEOUT_S = 60.0
# Reading the output must not keep it: RSS may grow by allocator noise, not by the output.
RSS_GROWTH_LIMIT = 25 * 1024 * 1024
SLOW_CALLBACK = re.compile(r"Executing (.*) took (\d+\.\d+) seconds")

# Mixed on stdout and stderr: many short lines, long lines, CR redraws and ::progress lines;
# the target also has a progress_regex, as people write them (unanchored).
FLOOD = """
import os, sys
total = int(sys.argv[1]) * 1024 * 1024
written = 0

def out(fd, data):
    global written
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    written += len(data)

block = 0
while written < total:
    block += 1
    fd = 1 if block % 2 else 2
    kind = block % 4
    if kind == 0:
        out(fd, b"".join(b"short line %d\\n" % n for n in range(5000)))
    elif kind == 1:
        out(fd, b"1" * 300_000 + b"\\n")  # digits: the progress_regex backtracks here
    elif kind == 2:
        out(fd, b"".join(b"\\rredraw %d" % n for n in range(3000)) + b"\\n")
    else:
        out(fd, b"::progress %d/%d writing\\n" % (written, total))
out(1, b"::progress %d/%d flooded\\nflood done\\n" % (total, total))
"""


def write_config(directory: Path) -> Path:
    (directory / "flood.py").write_text(FLOOD)
    config = directory / "config.toml"
    config.write_text(textwrap.dedent(f"""
        [store]
        path = "state/jobs.db"
        [progress]
        interval_ms = 100
        [api]
        listen = "127.0.0.1:0"
        [targets.flood]
        command = [{sys.executable!r}, "flood.py", "{OUTPUT_MB}"]
        progress_regex = '(?P<current>\\d+)\\s*/\\s*(?P<total>\\d+)'
        max_retries = 0
    """))
    return config


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def get_json(url: str, data: bytes | None = None) -> dict:
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def stored_output(directory: Path) -> list[str]:
    db = directory / "state" / "jobs.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as raw:
        [(result,)] = raw.execute("SELECT result FROM jobs").fetchall()
    return json.loads(result)["output"]


def blocked_callbacks(log: str) -> list[str]:
    return [match[0] for match in SLOW_CALLBACK.finditer(log)
            if float(match[2]) >= BLOCKED_S]


def test_a_job_with_50_mb_of_output_never_blocks_the_loop_for_a_second(tmp_path):
    service = Service(tmp_path, write_config(tmp_path), env={"PYTHONASYNCIODEBUG": "1"})
    try:
        service.wait_for_log("API listening on")
        [url] = re.findall(r"API listening on (http://\S+)", service.log)
        rss_before = rss_bytes(service.process.pid)
        job = get_json(f"{url}/v1/jobs", json.dumps({"target": "flood"}).encode())
        rss_peak, slowest, event = rss_before, 0.0, job
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while event["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, f"the job did not end: {event}"
            asked = time.monotonic()
            assert get_json(f"{url}/healthz")["status"] == "ok"
            slowest = max(slowest, time.monotonic() - asked)
            assert slowest < BLOCKED_S, f"/healthz took {slowest:.2f} s"
            assert not blocked_callbacks(service.log)
            rss_peak = max(rss_peak, rss_bytes(service.process.pid))
            event = get_json(f"{url}/v1/jobs/{job['id']}")
            time.sleep(PROBE_EVERY_S)
        rss_after = rss_bytes(service.process.pid)
        log = service.log
    finally:
        service.stop()
    print(f"slowest /healthz {slowest * 1000:.0f} ms; RSS {rss_before / 2**20:.1f} MB before, "
          f"{rss_peak / 2**20:.1f} MB peak, {rss_after / 2**20:.1f} MB after; "
          f"callbacks over 100 ms: {[m[2] for m in SLOW_CALLBACK.finditer(log)]}")
    assert event["status"] == "completed", event
    assert event["progress"]["percentage"] == 100.0
    assert event["message"] == "flooded"
    assert stored_output(tmp_path)[-1] == "flood done"  # every byte was read
    assert not blocked_callbacks(log)
    assert rss_peak - rss_before < RSS_GROWTH_LIMIT


def test_a_log_reader_that_stops_reading_never_freezes_the_service(tmp_path):
    """stderr is a pipe nobody reads (a hung journald): it fills after 64 KiB of log. Jobs
    that log tracebacks keep running, the API keeps answering, SIGTERM still stops it."""
    import os
    import shutil
    import signal
    import subprocess
    import tempfile

    from service_process import child_env

    socket_dir = tempfile.mkdtemp(prefix="mjl")  # unix socket paths are short
    sock = os.path.join(socket_dir, "api.sock")
    config = tmp_path / "config.toml"
    config.write_text(textwrap.dedent(f"""
        [store]
        path = "state/jobs.db"
        [api]
        listen = "unix:{sock}"
        [handlers]
        crash = "handler_plugins:Crashes"
        [targets.crash]
        handler = "crash"
        max_retries = 0
    """))
    here = str(Path(__file__).parent)
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
    service = subprocess.Popen([sys.executable, "-m", "matrixjobs", "run", "--config",
                                str(config)], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert service.poll() is None and time.monotonic() < deadline, "never listened"
            time.sleep(0.05)
        jobs = 300  # a traceback each, about 1 KB: far more than the pipe holds
        for _ in range(jobs):
            started = time.monotonic()
            assert unix_request(sock, "POST", "/v1/jobs", {"target": "crash"})[0] == 201
            assert time.monotonic() - started < BLOCKED_S
        deadline = time.monotonic() + 60
        while unix_request(sock, "GET", "/v1/jobs?status=failed&limit=1000")[1].count(
                '"id"') < jobs:
            assert time.monotonic() < deadline, "the failed jobs never all ended"
            time.sleep(0.2)
        service.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        assert service.wait(15) == 0
        # Lines still queued wait at most CLOSE_WAIT_S (2 s) for a reader that never comes.
        assert time.monotonic() - stopping < 6
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
        shutil.rmtree(socket_dir, ignore_errors=True)
    log = service.stderr.read().decode()
    service.stderr.close()
    assert "RuntimeError: the handler crashed" in log  # what fitted in the pipe


def unix_request(sock: str, method: str, path: str, body: object = None) -> tuple[int, str]:
    import http.client
    import socket

    class Connection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(BLOCKED_S * 5)
            self.sock.connect(sock)

    connection = Connection("localhost")
    try:
        data = None if body is None else json.dumps(body)
        connection.request(method, path, data, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()

"""The store in trouble, caused for real: a SQLite store on a 3 MiB file system this test
mounts, filled up and freed again while the service runs. /healthz tells the truth, new
jobs are refused with 503 and Retry-After, running jobs lose nothing."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet import answer as request
from fleet import free_port, wait_for
from service_process import Service

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

DEGRADED_WITHIN_S = 10.0


@pytest.fixture
def small_fs(tmp_path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """A file that takes every free byte of `directory`'s file system."""
    filler = directory / "filler"
    for chunk in (bytes(64 * 1024), b"x"):  # then the last few bytes
        with contextlib.suppress(OSError), open(filler, "ab", buffering=0) as f:
            while True:
                f.write(chunk)
    return filler


def write_config(directory: Path, store: Path, port: int, min_free_mb: float) -> Path:
    config = directory / "config.toml"
    config.write_text(textwrap.dedent(f"""
        [store]
        path = "{store}"
        min_free_mb = {min_free_mb}
        [queue]
        retry_backoff_s = 0.2
        [progress]
        interval_ms = 100
        [api]
        listen = "127.0.0.1:{port}"
        [targets.work]
        command = [{sys.executable!r}, "-c", "import time; print('working'); time.sleep(4)"]
        [targets.quick]
        command = [{sys.executable!r}, "-c", "print('quick')"]
    """), encoding="utf-8")
    return config


def until_health(port: int, status: int, timeout: float) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def check() -> bool:
        nonlocal found
        code, _, found = request(port, "GET", "/healthz")
        return code == status

    wait_for(check, timeout, f"/healthz {status}")
    return found


@pytest.mark.timeout(120)
def test_a_full_disk_is_said_everywhere_refuses_new_jobs_and_loses_none(tmp_path, small_fs):
    port = free_port()
    store = small_fs / "state" / "jobs.db"
    config = write_config(tmp_path, store, port, min_free_mb=0)
    service = Service(tmp_path, config)
    service.wait_until_started()
    filler = None
    try:
        code, _, running = request(port, "POST", "/v1/jobs", {"target": "work"})
        assert code == 201
        wait_for(lambda: request(port, "GET", f"/v1/jobs/{running['id']}")[2]["status"]
                 == "processing", 10, "the job running")
        filler = fill(small_fs)
        health = until_health(port, 503, DEGRADED_WITHIN_S)
        assert health["status"] == "degraded"
        assert health["reason"].startswith("store: disk full")

        code, headers, refused = request(port, "POST", "/v1/jobs", {"target": "quick"})
        assert code == 503
        assert refused["error"]["code"] == "store_unavailable"
        assert refused["error"]["message"].startswith("store: disk full")
        assert headers["Retry-After"] == "10"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            metrics_text = r.read().decode()
        assert "matrixjobs_store_up 0.0" in metrics_text
        assert 'matrixjobs_store_errors_total{kind="disk full"}' in metrics_text

        time.sleep(4)  # the running job ends while the disk is full: its outcome waits
        filler.unlink()
        filler = None
        assert until_health(port, 200, DEGRADED_WITHIN_S)["status"] == "ok"
        final = wait_for(lambda: (j := request(port, "GET", f"/v1/jobs/{running['id']}")[2])
                         ["status"] == "completed" and j, 20, "the job completed")
        code, _, quick = request(port, "POST", "/v1/jobs", {"target": "quick"})
        assert code == 201
        wait_for(lambda: request(port, "GET", f"/v1/jobs/{quick['id']}")[2]["status"]
                 == "completed", 20, "a new job completed")
    finally:
        if filler is not None:
            filler.unlink()
        service.stop()
    assert final["jobDetails"]["retryCount"] == 0  # it ran once, its outcome kept
    assert "Traceback" not in service.log  # a full disk is said in lines, not tracebacks


@pytest.mark.timeout(120)
def test_below_the_free_space_floor_new_jobs_are_refused_before_the_disk_is_full(
        tmp_path, small_fs):
    port = free_port()
    store = small_fs / "state" / "jobs.db"
    config = write_config(tmp_path, store, port, min_free_mb=1)
    service = Service(tmp_path, config)
    service.wait_until_started()
    ballast = small_fs / "ballast"
    try:
        assert until_health(port, 200, DEGRADED_WITHIN_S)["status"] == "ok"
        free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
        ballast.write_bytes(bytes(free - 512 * 1024))  # half a MiB left: below the floor
        health = until_health(port, 503, DEGRADED_WITHIN_S)
        assert health["reason"].startswith("store: disk full (")
        assert "below [store] min_free_mb = 1)" in health["reason"]
        code, _, refused = request(port, "POST", "/v1/jobs", {"target": "quick"})
        assert (code, refused["error"]["code"]) == (503, "store_unavailable")
        ballast.unlink()
        assert until_health(port, 200, DEGRADED_WITHIN_S)["status"] == "ok"
        code, _, _ = request(port, "POST", "/v1/jobs", {"target": "quick"})
        assert code == 201
    finally:
        with contextlib.suppress(FileNotFoundError):
            ballast.unlink()
        service.stop()
    said = [line for line in service.log.splitlines() if "store is unavailable" in line]
    assert len(said) == 1, service.log  # once per outage, not per probe

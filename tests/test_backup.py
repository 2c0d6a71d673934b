"""`matrixjobs backup`: a copy of the live store taken while jobs run, private, checked,
that `matrixjobs run` accepts and that holds every job finished before it began."""

from __future__ import annotations

import io
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fleet import api, free_port, wait_for
from service_process import Service, child_env

from matrixjobs.ops.doctor import doctor
from matrixjobs.ops.report import Mark


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "matrixjobs", *args], cwd=cwd,
                          env=child_env(), capture_output=True, text=True, timeout=60,
                          check=False)


def write_config(directory: Path, port: int, store: str = "state/jobs.db") -> Path:
    config = directory / "config.toml"
    config.write_text(textwrap.dedent(f"""
        [store]
        path = "{store}"
        [queue]
        workers = 2
        [api]
        listen = "127.0.0.1:{port}"
        [targets.quick]
        command = [{sys.executable!r}, "-c", "print('done')"]
        [targets.slow]
        command = [{sys.executable!r}, "-c", "import time; time.sleep(30)"]
    """), encoding="utf-8")
    return config


@pytest.mark.timeout(120)
def test_a_backup_taken_while_jobs_run_holds_every_finished_job_and_runs(tmp_path):
    port = free_port()
    config = write_config(tmp_path, port)
    service = Service(tmp_path, config)
    service.wait_until_started()
    backup = tmp_path / "backups" / "jobs.db"
    backup.parent.mkdir()
    try:
        finished = [api(port, "POST", "/v1/jobs", {"target": "quick"})["id"]
                    for _ in range(20)]
        for job_id in finished:
            wait_for(lambda j=job_id: api(port, "GET", f"/v1/jobs/{j}")["status"]
                     == "completed", 20, f"{job_id} completed")
        running = [api(port, "POST", "/v1/jobs", {"target": "slow"})["id"] for _ in range(2)]
        wait_for(lambda: all(api(port, "GET", f"/v1/jobs/{j}")["status"] == "processing"
                             for j in running), 20, "both slow jobs running")
        result = cli(tmp_path, "backup", "--config", str(config), "--to", str(backup))
        later = api(port, "POST", "/v1/jobs", {"target": "quick"})["id"]  # still taking work
    finally:
        service.stop()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"backed up {tmp_path / 'state' / 'jobs.db'} to {backup}: "
                                    "22 jobs, 0 batches, 20 logs,"), result.stdout
    assert "(integrity check: ok)" in result.stdout
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert [p.name for p in backup.parent.iterdir()] == ["jobs.db"]  # nothing half-written

    # The copy is a store the service accepts: started on it, it has every finished job.
    restored = tmp_path / "restored"
    restored.mkdir()
    (restored / "state").mkdir()
    backup.rename(restored / "state" / "jobs.db")
    port = free_port()
    service = Service(restored, write_config(restored, port))
    service.wait_until_started()
    try:
        for job_id in finished:
            assert api(port, "GET", f"/v1/jobs/{job_id}")["status"] == "completed"
        states = {j: api(port, "GET", f"/v1/jobs/{j}")["status"] for j in running}
        assert set(states.values()) <= {"pending", "processing"}, states  # recovered
    finally:
        service.stop()
    assert later not in {job_id for job_id in finished}


def test_a_backup_refuses_to_overwrite_and_says_why_in_one_line(tmp_path):
    config = write_config(tmp_path, free_port(), store="jobs.db")
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        db.execute("CREATE TABLE t (x)")
    taken = tmp_path / "taken.db"
    taken.write_text("precious")
    result = cli(tmp_path, "backup", "--config", str(config), "--to", str(taken))
    assert result.returncode == 1
    assert result.stderr == f"error: {taken} exists: remove it or name another file\n"
    assert taken.read_text() == "precious"

    missing = cli(tmp_path, "backup", "--config", str(config), "--to",
                  str(tmp_path / "no-such-dir" / "copy.db"))
    assert missing.returncode == 1
    assert missing.stderr.startswith(f"error: cannot write {tmp_path / 'no-such-dir'}")
    assert "Traceback" not in missing.stderr


def test_a_postgresql_store_gets_the_pg_dump_command_without_its_password(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[store]\nbackend = "postgresql"\n'
                      'url = "postgresql://matrixjobs@db.example.org:5433/jobs"\n')
    result = subprocess.run(
        [sys.executable, "-m", "matrixjobs", "backup", "--config", str(config), "--to",
         "/srv/backups/jobs dump"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**child_env(), "MATRIXJOBS_DATABASE_URL":
             "postgresql://matrixjobs:s3cret@db.example.org:5433/jobs"}, check=False)
    assert result.returncode == 0, result.stderr
    assert ("pg_dump --format=custom --file '/srv/backups/jobs dump' "
            "postgresql://matrixjobs@db.example.org:5433/jobs") in result.stdout
    assert "s3cret" not in result.stdout + result.stderr


def test_doctor_finds_a_damaged_store(tmp_path):
    db = tmp_path / "state" / "jobs.db"
    db.parent.mkdir()
    with sqlite3.connect(db) as raw:
        raw.execute("CREATE TABLE t (x TEXT)")
        raw.executemany("INSERT INTO t VALUES (?)", [(str(i) * 50,) for i in range(2000)])
    raw.close()
    data = bytearray(db.read_bytes())
    page = 4096
    data[4 * page + 8: 4 * page + 40] = b"\xff" * 32  # page 5's cell pointers, out of range
    db.write_bytes(bytes(data))
    config = write_config(tmp_path, free_port())
    report = doctor(config, environ={}, out=io.StringIO())
    [store] = [f for f in report.findings if f.check == "store"]
    assert store.mark is Mark.FAIL
    # Which damage quick_check names first is SQLite's choice: it has named the cells of
    # page 5 (and how many more), and once in a CI run only "database disk image is
    # malformed".
    assert "is damaged (SQLite's quick_check: " in store.text, store.text
    assert store.text.endswith("); restore it from a backup")
    assert "\n" not in store.text

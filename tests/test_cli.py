"""The `matrixjobs` command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_process import EXIT_TIMEOUT_S, STARTUP_TIMEOUT_S, Service, child_env

PYTHON = json.dumps(sys.executable)  # a TOML string naming this interpreter

GOOD_CONFIG = f"""
    [store]
    path = "state/matrixjobs.db"

    [queue]
    workers = 2

    [progress]
    interval_ms = 50

    [api]
    listen = "127.0.0.1:0"

    [targets.hello]
    command = [{PYTHON}, "-c", "print('hello')"]
"""


def cli(cwd: Path, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "matrixjobs", *args],
        cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout,
        check=False,
    )


def write(directory: Path, text: str, name: str = "config.toml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def assert_clean_error(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in started:
        service.stop()


@pytest.fixture
def start_service(tmp_path: Path, services: list[Service]):
    def start(config: Path, log_name: str = "service.log") -> Service:
        service = Service(tmp_path, config, log_name)
        services.append(service)
        return service

    return start


# -- basics ------------------------------------------------------------------------------------


def test_version_prints_the_package_version(tmp_path):
    from matrixjobs import __version__

    result = cli(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"matrixjobs {__version__}"


def test_no_subcommand_is_a_usage_error(tmp_path):
    result = cli(tmp_path)
    assert result.returncode == 2
    assert "usage: matrixjobs" in result.stderr
    assert "Traceback" not in result.stderr


# -- check-config ------------------------------------------------------------------------------


def test_check_config_accepts_a_good_config(tmp_path):
    config = write(tmp_path, GOOD_CONFIG)
    result = cli(tmp_path, "check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config OK")
    assert f"store: {tmp_path / 'state' / 'matrixjobs.db'}" in result.stdout
    assert "workers: 2" in result.stdout
    assert "targets: hello" in result.stdout
    assert "warning:" not in result.stderr
    # Checking must not create the store.
    assert not (tmp_path / "state").exists()


def test_check_config_names_the_webhooks_and_schedules_as_it_names_the_targets(tmp_path):
    config = write(tmp_path, GOOD_CONFIG + """
    [webhooks.site]
    provider = "generic"
    target = "hello"

    [schedules.nightly]
    cron = "30 2 * * *"
    target = "hello"

    [schedules.hourly]
    cron = "@hourly"
    target = "hello"
    """)
    write(tmp_path, "MATRIXJOBS_WEBHOOK_SITE_SECRET=s3cret-enough-for-a-test\n", ".env")
    result = cli(tmp_path, "check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "  webhooks: site\n" in result.stdout
    assert "  schedules: hourly, nightly\n" in result.stdout
    bare = cli(tmp_path, "check-config", "--config", str(write(tmp_path, GOOD_CONFIG)))
    assert "webhooks: none" in bare.stdout and "schedules: none" in bare.stdout


def test_check_config_accepts_the_example_config(tmp_path):
    example = Path(__file__).resolve().parent.parent / "config.example.toml"
    result = cli(tmp_path, "check-config", "--config", str(example))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config OK")
    assert "targets: deploy, docs, release, site" in result.stdout


def test_check_config_reads_config_toml_in_the_cwd_by_default(tmp_path):
    write(tmp_path, GOOD_CONFIG)
    result = cli(tmp_path, "check-config")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config OK")


def test_check_config_rejects_a_bad_config_naming_the_keys(tmp_path):
    config = write(tmp_path, """
        [queue]
        wokers = 4

        [targets.docs]
        command = "make docs"
    """)
    result = cli(tmp_path, "check-config", "--config", str(config))
    assert_clean_error(result)
    assert "queue.wokers: unknown key" in result.stderr
    assert "targets.docs.command: expected a list" in result.stderr
    assert "config OK" not in result.stdout


def test_check_config_reports_a_toml_syntax_error_with_its_line(tmp_path):
    config = write(tmp_path, "[queue]\nworkers = = 4\n")
    result = cli(tmp_path, "check-config", "--config", str(config))
    assert_clean_error(result)
    assert "TOML syntax error" in result.stderr
    assert "line 2" in result.stderr


def test_check_config_reports_a_missing_file(tmp_path):
    result = cli(tmp_path, "check-config", "--config", "nope.toml")
    assert_clean_error(result)
    assert "nope.toml: config file not found" in result.stderr


def test_check_config_warns_about_a_missing_executable_but_succeeds(tmp_path):
    config = write(tmp_path, """
        [targets.ghost]
        command = ["matrixjobs-no-such-program-xyz"]
    """)
    result = cli(tmp_path, "check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config OK")
    assert ("warning: targets.ghost: executable 'matrixjobs-no-such-program-xyz' not found "
            "on PATH" in result.stderr.splitlines())


def test_check_config_warns_about_a_runs_on_label_no_worker_of_a_sqlite_store_has(tmp_path):
    config = write(tmp_path, """
        [targets.train]
        handler = "sitebuild"
        runs_on = ["gpu"]
    """)
    result = cli(tmp_path, "check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "warning: targets.train: runs_on gpu, but this node's worker labels are none and a "
        "SQLite store has no other workers: its jobs would wait forever"]


def test_check_config_warns_softly_about_a_runs_on_label_with_postgresql(tmp_path):
    config = write(tmp_path, """
        [store]
        backend = "postgresql"
        url = "postgresql://matrixjobs@db.example.org/matrixjobs"
        [worker]
        labels = ["arm64"]
        [targets.train]
        handler = "sitebuild"
        runs_on = ["gpu"]
    """)
    result = cli(tmp_path, "check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "warning: targets.train: runs only on workers labelled gpu; this node has none of "
        "them, so another worker must take its jobs"]


def test_check_config_rejects_a_homeserver_url_typo(tmp_path):
    config = write(tmp_path, """
        [matrix]
        homeserver = "https://matrix.example.org:8o"
        user_id = "@jobs:example.org"
    """)
    result = cli(tmp_path, "check-config", "--config", str(config))
    assert_clean_error(result)
    assert "matrix.homeserver: 'https://matrix.example.org:8o' is not a valid URL" in result.stderr



def test_check_config_rejects_an_unknown_handler(tmp_path):
    config = write(tmp_path, """
        [targets.site]
        handler = "nope"
    """)
    result = cli(tmp_path, "check-config", "--config", str(config))
    assert_clean_error(result)
    assert "targets.site.handler: unknown handler 'nope'" in result.stderr


# -- run ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_starts_and_stops_cleanly_on_signal(tmp_path, start_service, signum):
    config = write(tmp_path, GOOD_CONFIG)
    service = start_service(config)
    service.wait_until_started()
    store = tmp_path / "state" / "matrixjobs.db"
    assert store.is_file()
    assert f"store {store}" in service.log

    service.process.send_signal(signum)
    returncode = service.process.wait(timeout=EXIT_TIMEOUT_S)
    log = service.log
    assert returncode == 0, log
    assert "matrixjobs stopped" in log
    assert "Traceback" not in log


def test_signal_sent_as_soon_as_started_is_logged_still_stops_cleanly(tmp_path):
    """Once the service says it started, a signal must shut it down gracefully.

    Six services are signalled the instant their "matrixjobs started" line appears
    (three SIGTERM, three SIGINT), to catch a window where the signal is not handled yet.
    """
    signals = [signal.SIGTERM, signal.SIGINT] * 3
    children: list[subprocess.Popen[str]] = []
    logs: list[list[str]] = [[] for _ in signals]

    def follow(child: subprocess.Popen[str], signum: int, lines: list[str]) -> None:
        assert child.stderr is not None
        for line in child.stderr:
            lines.append(line)
            if "matrixjobs started" in line:
                child.send_signal(signum)

    try:
        threads = []
        for number, signum in enumerate(signals):
            directory = tmp_path / f"service{number}"
            directory.mkdir()
            config = write(directory, GOOD_CONFIG)
            child = subprocess.Popen(
                [sys.executable, "-m", "matrixjobs", "run", "--config", str(config)],
                cwd=directory, env=child_env(), stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, text=True,
            )
            children.append(child)
            thread = threading.Thread(target=follow, args=(child, signum, logs[number]),
                                      daemon=True)
            thread.start()
            threads.append(thread)
        results = []
        for child, signum, lines, thread in zip(children, signals, logs, threads, strict=True):
            returncode = child.wait(timeout=STARTUP_TIMEOUT_S + EXIT_TIMEOUT_S)
            thread.join(timeout=EXIT_TIMEOUT_S)
            log = "".join(lines)
            assert "matrixjobs started" in log, log
            results.append((signal.Signals(signum).name, returncode,
                            "matrixjobs stopped" in log))
        assert all(code == 0 and stopped for _, code, stopped in results), results
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=EXIT_TIMEOUT_S)


def test_run_refuses_a_corrupt_database(tmp_path):
    store = tmp_path / "state" / "matrixjobs.db"
    store.parent.mkdir()
    store.write_bytes(os.urandom(8192))
    config = write(tmp_path, GOOD_CONFIG)
    began = time.monotonic()
    result = cli(tmp_path, "run", "--config", str(config), timeout=EXIT_TIMEOUT_S)
    assert time.monotonic() - began < EXIT_TIMEOUT_S
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error, result.stderr
    assert "corrupt" in error[0] or "not a database" in error[0]
    assert str(store) in error[0]


def test_second_run_on_the_same_store_is_refused(tmp_path, start_service):
    config = write(tmp_path, GOOD_CONFIG)
    first = start_service(config)
    first.wait_until_started()

    result = cli(tmp_path, "run", "--config", str(config), timeout=EXIT_TIMEOUT_S)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "in use by another matrixjobs process" in result.stderr
    assert f"pid {first.process.pid}" in result.stderr
    # The first service is unaffected.
    assert first.process.poll() is None
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(timeout=EXIT_TIMEOUT_S) == 0


def test_run_refuses_an_unknown_handler(tmp_path):
    config = write(tmp_path, GOOD_CONFIG + """
        [targets.site]
        handler = "nope"
    """)
    result = cli(tmp_path, "run", "--config", str(config), timeout=EXIT_TIMEOUT_S)
    assert_clean_error(result)
    assert "targets.site.handler: unknown handler 'nope'" in result.stderr
    assert "matrixjobs started" not in result.stderr


def test_run_reports_a_bad_config_without_traceback(tmp_path):
    config = write(tmp_path, """
        [queue]
        workers = 0
    """)
    result = cli(tmp_path, "run", "--config", str(config), timeout=EXIT_TIMEOUT_S)
    assert_clean_error(result)
    assert "queue.workers" in result.stderr
    assert not (tmp_path / "matrixjobs.db").exists()


def test_worker_needs_a_postgresql_store(tmp_path):
    config = write(tmp_path, GOOD_CONFIG)
    result = cli(tmp_path, "worker", "--config", str(config), timeout=EXIT_TIMEOUT_S)
    assert_clean_error(result)
    assert "a worker needs a PostgreSQL store" in result.stderr
    assert not (tmp_path / "matrixjobs.db").exists()


def test_worker_with_no_job_slots_is_refused(tmp_path):
    config = write(tmp_path, """
        [store]
        backend = "postgresql"
        url = "postgresql://127.0.0.1:1/none"
        [queue]
        workers = 0
    """)
    result = cli(tmp_path, "worker", "--config", str(config), timeout=EXIT_TIMEOUT_S)
    assert_clean_error(result)
    assert "queue.workers = 0: a worker with no job slots would do nothing" in result.stderr


def test_worker_names_an_unreachable_database_by_host_and_port(tmp_path):
    config = write(tmp_path, """
        [store]
        backend = "postgresql"
        url = "postgresql://127.0.0.1:1/jobs"
    """)
    result = cli(tmp_path, "worker", "--config", str(config), timeout=30)
    assert_clean_error(result)
    assert "cannot connect to PostgreSQL at 127.0.0.1:1/jobs" in result.stderr

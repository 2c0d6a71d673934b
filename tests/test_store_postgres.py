"""The PostgreSQL store's own concerns: migrations, one owner, faults at start, a real service.

What every backend must do is in test_store_contract.py.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
from service_process import Service, child_env

from matrixjobs.errors import StoreError
from matrixjobs.models import JobSpec, Outcome, Status
from matrixjobs.store.postgres import MIGRATIONS, PostgresStore


def spec(name: str = "x") -> JobSpec:
    return JobSpec(type="t", data={}, name=name, max_retries=0, timeout_s=5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def schema_versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute("SELECT version FROM schema_version ORDER BY 1")]


# Opens the store at the given time, after the slow part (starting Python) is over.
OPEN_AT = """
import asyncio, sys, time
from matrixjobs.store.postgres import PostgresStore

async def main():
    store = PostgresStore(sys.argv[1])
    await asyncio.sleep(float(sys.argv[2]) - time.time())
    await store.open()
    await store.close()

asyncio.run(main())
"""


def test_processes_starting_at_once_apply_each_migration_once(pg_url):
    at = str(time.time() + 3)
    children = [subprocess.Popen([sys.executable, "-c", OPEN_AT, pg_url, at],
                                 stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [child.communicate(timeout=60)[1] for child in children]
    assert [child.returncode for child in children] == [0, 0, 0, 0], errors
    assert schema_versions(pg_url) == list(range(1, len(MIGRATIONS) + 1))


async def test_a_schema_newer_than_the_code_is_refused(pg_url):
    store = PostgresStore(pg_url)
    await store.open()
    await store.close()
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO schema_version VALUES (%s, now())", (len(MIGRATIONS) + 1,))
    with pytest.raises(StoreError, match=r"newer than this matrixjobs understands.*upgrade"):
        await PostgresStore(pg_url).open()


async def test_an_unreachable_server_is_named_by_host_and_port_never_the_password():
    port = free_port()
    store = PostgresStore(f"postgresql://mj:s3cret-pw@127.0.0.1:{port}/jobs")
    started = time.monotonic()
    with pytest.raises(StoreError) as raised:
        await store.open()
    assert time.monotonic() - started < 10
    message = str(raised.value)
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}/jobs" in message
    assert "s3cret-pw" not in message


async def test_concurrent_claims_never_take_the_same_job(pg_url):
    """SKIP LOCKED: two stores on one database split the work."""
    stores = [PostgresStore(pg_url) for _ in range(2)]
    for store in stores:
        await store.open()
    try:
        jobs = await stores[0].add_jobs([spec(f"n{i}") for i in range(300)], time.time())

        async def drain(store: PostgresStore, owner: str) -> list[str]:
            taken: list[str] = []
            while claimed := (await store.settle_and_claim([], owner, 7, time.time(), 60)).claimed:
                taken += [job.id for job in claimed]
            return taken

        first, second = await asyncio.gather(drain(stores[0], "a"), drain(stores[1], "b"))
        assert not set(first) & set(second)
        assert sorted(first + second) == sorted(job.id for job in jobs)
    finally:
        for store in stores:
            await store.close()


async def test_a_nul_in_output_is_stored_as_a_replacement_character(pg_url):
    store = PostgresStore(pg_url)
    await store.open()
    try:
        [job] = await store.add_jobs([spec()], time.time())
        await store.settle_and_claim([], "me", 1, time.time(), 60)
        await store.settle_and_claim(
            [Outcome(job.id, Status.FAILED, time.time(), error="bad\x00byte", log="a\x00b")],
            "me", 0, time.time(), 60)
        assert await store.get_log(job.id) == "a\ufffdb"
        assert (await store.get_job(job.id)).error == "bad\ufffdbyte"
    finally:
        await store.close()


# Says whether the database URL (a secret) reached the target's environment.
HELLO = "import os; print('url seen' if 'MATRIXJOBS_DATABASE_URL' in os.environ else 'no url')"


def write_config(directory: Path, url: str | None, port: int) -> Path:
    directory.mkdir(exist_ok=True)
    config = directory / "config.toml"
    config.write_text(textwrap.dedent(f"""
        [store]
        backend = "postgresql"
        {f'url = "{url}"' if url else ""}
        [api]
        listen = "127.0.0.1:{port}"
        [targets.hello]
        command = [{sys.executable!r}, "-c", "{HELLO}"]
    """))
    return config


def with_password(url: str, password: str) -> str:
    """The test server trusts local users: a password in the URL is carried, never checked."""
    return url.replace("postgresql://", f"postgresql://{getpass.getuser()}:{password}@", 1)


def api(port: int, method: str, path: str, body: dict | None = None) -> bytes:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


@pytest.mark.timeout(60)
def test_a_real_service_runs_a_job_submitted_over_the_api_on_postgresql(tmp_path, pg_url):
    port = free_port()
    secret_url = with_password(pg_url, "db-pass-7431")
    service = Service(tmp_path, write_config(tmp_path, None, port),
                      env={"MATRIXJOBS_DATABASE_URL": secret_url})
    try:
        service.wait_until_started()
        assert "store PostgreSQL at 127.0.0.1:5432/mj_test_" in service.log
        job = json.loads(api(port, "POST", "/v1/jobs", {"target": "hello"}))
        deadline = time.monotonic() + 20
        while (state := json.loads(api(port, "GET", f"/v1/jobs/{job['id']}")))["status"] != (
                "completed"):
            assert time.monotonic() < deadline, state
            time.sleep(0.1)
        assert b"no url" in api(port, "GET", f"/v1/jobs/{job['id']}/log")
    finally:
        service.stop()
    assert "db-pass-7431" not in service.log
    with psycopg.connect(pg_url) as conn:
        [(status,)] = conn.execute("SELECT status FROM jobs")
    assert status == "completed"


def test_run_with_an_unreachable_database_exits_like_a_config_error(tmp_path):
    port = free_port()
    config = write_config(tmp_path, "postgresql://mj@127.0.0.1:1/jobs", free_port())
    result = subprocess.run(
        [sys.executable, "-m", "matrixjobs", "run", "--config", str(config)],
        env={**child_env(), "MATRIXJOBS_DATABASE_URL": f"postgresql://mj:pw-9x@127.0.0.1:{port}/j"},
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}/j" in result.stderr
    assert "pw-9x" not in result.stderr


async def test_connections_the_server_dropped_are_replaced_not_used(pg_url):
    store = PostgresStore(pg_url)
    await store.open()
    try:
        [job] = await store.add_jobs([spec()], time.time())
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid != pg_backend_pid()")
        assert (await store.get_job(job.id)).name == "x"
        await store.add_jobs([spec("after")], time.time())
    finally:
        await store.close()

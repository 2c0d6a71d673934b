"""The client commands (status, submit, batch, rerun, cancel, jobs) run as subprocesses against a
real running service; the service lives in the test's event loop, so the CLI runs through
asyncio subprocesses while the service keeps serving."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import counting_target, final_state, make_config, python_target

from matrixjobs.api import ApiServer
from matrixjobs.app import App
from matrixjobs.models import Worker
from matrixjobs.service import build_service

TOKEN = "cli-s3cret"

COUNT = counting_target(0.03)
FAIL = python_target("""
    import sys
    print("::progress 1/2 half way", flush=True)
    sys.exit(3)
""", max_retries=0)
SLOW = python_target("""
    import time
    for step in range(1, 3001):
        print(f"::progress {step}/3000", flush=True)
        time.sleep(0.02)
""")
QUICK = python_target("print('done')")
TARGETS = {"count": COUNT, "fail": FAIL, "slow": SLOW, "quick": QUICK}


class Service:
    def __init__(self, app: App) -> None:
        self.app = app
        [api] = [c for c in app.components if isinstance(c, ApiServer)]
        self.url = api.url


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err
        self.lines = [line for line in out.splitlines() if line.strip()]

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]

    def __repr__(self) -> str:
        return f"Result(code={self.code}, out={self.out!r}, err={self.err!r})"


def cli_env(url: str, token: str | None = None,
            extra_env: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MATRIXJOBS_")}
    env |= extra_env or {}
    env["MATRIXJOBS_API_URL"] = url
    if token is not None:
        env["MATRIXJOBS_API_TOKEN"] = token
    return env


async def spawn(url: str, *args: str, token: str | None = None,
                extra_env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "matrixjobs", *args, env=cli_env(url, token, extra_env),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def run_cli(url: str, *args: str, token: str | None = None,
                  timeout: float = 20.0, extra_env: dict[str, str] | None = None) -> Result:
    process = await spawn(url, *args, token=token, extra_env=extra_env)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    apps: list[App] = []

    async def start(**api: Any) -> Service:
        config = make_config(tmp_path, targets=TARGETS, api={"listen": "127.0.0.1:0", **api})
        app = build_service(config)
        apps.append(app)
        await app.start()
        return Service(app)

    yield start
    for app in apps:
        await app.stop()


@pytest.fixture
async def svc(service) -> Service:
    return await service()


async def started(app: App, subject: str) -> None:
    async for event in app.watch(subject):
        if event.status == "processing":
            return


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- submit ---------------------------------------------------------------------------------------


async def test_submit_wait_success_prints_plain_lines_and_exits_0(svc):
    result = await run_cli(svc.url, "submit", "count", "5", "--wait", "--poll", "200ms")
    assert result.code == 0, result
    assert all(line.startswith("j1 job count ") for line in result.lines), result
    assert "completed" in result.lines[-1]
    assert any("%" in line for line in result.lines)  # progress was shown on the way


async def test_submit_wait_failure_exits_1(svc):
    result = await run_cli(svc.url, "submit", "fail", "--wait")
    assert result.code == 1, result
    assert "failed" in result.lines[-1]


async def test_submit_json_and_wait_json_are_ndjson(svc):
    result = await run_cli(svc.url, "submit", "quick", "--json")
    assert result.code == 0, result
    [created] = result.json_lines()
    assert created["id"] == "j1" and created["name"] == "quick"

    result = await run_cli(svc.url, "submit", "count", "8", "--wait", "--json")
    assert result.code == 0, result
    events = result.json_lines()
    assert {event["id"] for event in events} == {"j2"}
    assert events[-1]["status"] == "completed"
    percentages = [e["progress"]["percentage"] for e in events if e.get("progress")]
    assert percentages == sorted(percentages) and percentages[-1] == 100.0


async def test_api_errors_are_printed_with_exit_1(svc):
    unknown = await run_cli(svc.url, "submit", "nope")
    assert unknown.code == 1 and "nope" in unknown.err and "404" in unknown.err, unknown
    bad_args = await run_cli(svc.url, "submit", "count", "abc")
    assert bad_args.code == 1 and "422" in bad_args.err, bad_args
    missing = await run_cli(svc.url, "status", "j999")
    assert missing.code == 1 and "j999" in missing.err, missing
    usage = await run_cli(svc.url, "cancel")
    assert usage.code == 2


# -- status, jobs, cancel, batch -------------------------------------------------------------------


async def test_status_id_and_jobs(svc):
    job = await svc.app.submit("count", ["3"])
    await final_state(svc.app, job.id)

    status = await run_cli(svc.url, "status", job.id)
    assert status.code == 0
    assert status.lines == [f"{job.id} job count 3 completed 100% 3/3 · step 3"]
    [event] = (await run_cli(svc.url, "status", job.id, "--json")).json_lines()
    assert event["id"] == job.id and event["status"] == "completed"

    jobs = await run_cli(svc.url, "jobs")
    assert jobs.code == 0 and jobs.lines[0].startswith(f"{job.id} job count 3 completed")
    listed = (await run_cli(svc.url, "jobs", "--json")).json_lines()
    assert [event["id"] for event in listed] == [job.id]


async def test_cancel_a_running_job_then_again(svc):
    job = await svc.app.submit("slow")
    await asyncio.wait_for(started(svc.app, job.id), 10)
    running = await run_cli(svc.url, "status", "--json")
    assert [event["id"] for event in running.json_lines()] == [job.id]

    result = await run_cli(svc.url, "cancel", job.id, "--json")
    assert result.code == 0, result
    assert result.json_lines()[0]["status"] == "cancelled"
    again = await run_cli(svc.url, "cancel", job.id)
    assert again.code == 1 and "409" in again.err, again


async def test_rerun_runs_it_again_and_waits(svc):
    job = await svc.app.submit("count", ["2"])
    await final_state(svc.app, job.id)
    result = await run_cli(svc.url, "rerun", job.id, "--wait")
    assert result.code == 0, result
    assert result.lines[-1].startswith("j2 job count 2 completed"), result
    assert (await svc.app.status("j2")).requester == "cli"
    missing = await run_cli(svc.url, "rerun", "b7")
    assert missing.code == 1 and "404" in missing.err, missing


async def test_batch_wait(svc):
    result = await run_cli(svc.url, "batch", "count", "quick", "--wait")
    assert result.code == 0, result
    assert all(line.startswith("b1 batch ") for line in result.lines), result
    assert "completed" in result.lines[-1] and "2/2 operations" in result.lines[-1]

    failing = await run_cli(svc.url, "batch", "quick", "fail", "--wait", "--json")
    assert failing.code == 1, failing
    last = failing.json_lines()[-1]
    assert last["id"] == "b2" and last["batchDetails"]["failedOperations"] == 1


# -- watching -------------------------------------------------------------------------------------


async def test_watch_one_id_in_plain_mode_until_it_ends(svc):
    job = await svc.app.submit("count", ["80"])  # 2.4 s: still running when the CLI is up
    result = await run_cli(svc.url, "status", job.id, "--watch")
    assert result.code == 0, result
    assert len(result.lines) >= 3  # several updates, one line each
    assert all(line.startswith(f"{job.id} job count") for line in result.lines)
    assert "completed" in result.lines[-1]

    failed = await svc.app.submit("fail")
    result = await run_cli(svc.url, "status", failed.id, "--watch", "--json")
    assert result.code == 1 and result.json_lines()[-1]["status"] == "failed", result


async def test_watch_all_discovers_a_job_submitted_after_it_started(svc):
    old = await svc.app.submit("quick")
    await final_state(svc.app, old.id)
    process = await spawn(svc.url, "status", "--watch", "--poll", "200ms")
    try:
        assert process.stderr is not None and process.stdout is not None
        note = await asyncio.wait_for(process.stderr.readline(), 10)
        assert b"watching" in note
        job = await svc.app.submit("count", ["5"])
        lines: list[str] = []
        while not lines or "completed" not in lines[-1]:
            line = await asyncio.wait_for(process.stdout.readline(), 10)
            assert line, "watch ended early"
            lines.append(line.decode().strip())
        assert all(line.startswith(f"{job.id} job count") for line in lines), lines
        assert process.returncode is None  # watching everything goes on until interrupted
    finally:
        process.terminate()
        await process.wait()


# -- workers ------------------------------------------------------------------------------------


async def test_workers_as_json_plain_lines_and_a_table(svc):
    now = time.time()
    await svc.app.store.register_worker(Worker(
        id="gone:1:ab", name="build-02", host="gone", pid=1, role="worker", labels=["gpu"],
        slots=4, version="0.0.9", started_at=now - 3600, heartbeat_at=now - 125))
    job = await svc.app.submit("slow")
    await started(svc.app, job.id)
    as_json = await run_cli(svc.url, "workers", "--json")
    assert as_json.code == 0, as_json
    [answer] = as_json.json_lines()
    here = svc.app.config.worker.name
    assert {w["name"]: (w["running"], w["alive"]) for w in answer["workers"]} == {
        "build-02": ([], False), here: ([job.id], True)}
    plain = await run_cli(svc.url, "workers")
    assert plain.code == 0, plain
    lines = {line.split()[0]: line for line in plain.lines}
    assert re.fullmatch(r"build-02 gone worker gpu 0/4 running 2m \d\ds ago "
                        r"silent for 2m \d\ds", lines["build-02"]), plain
    assert re.fullmatch(rf"{here} \S+ run - 1/4 running \d+s ago alive", lines[here]), plain
    table = await run_cli(svc.url, "workers", extra_env={"FORCE_COLOR": "1", "COLUMNS": "160",
                                                         "TTY_COMPATIBLE": "1"})
    assert "last heartbeat" in table.out and "silent for 2m" in table.out, table


async def test_workers_errors_as_the_other_commands(service):
    svc = await service(token=TOKEN)
    wrong = await run_cli(svc.url, "workers", token="not-it")
    assert wrong.code == 1 and "401" in wrong.err, wrong
    gone = await run_cli(f"http://127.0.0.1:{free_port()}", "workers")
    assert gone.code == 3 and "cannot reach" in gone.err, gone


# -- connection problems --------------------------------------------------------------------------


async def test_service_not_running_exits_3():
    url = f"http://127.0.0.1:{free_port()}"
    result = await run_cli(url, "jobs")
    assert result.code == 3, result
    assert f"cannot reach the matrixjobs service at {url}" in result.err


async def test_wrong_token_is_a_clear_error(service):
    svc = await service(token=TOKEN)
    wrong = await run_cli(svc.url, "jobs", token="not-it")
    assert wrong.code == 1, wrong
    assert "token" in wrong.err and "401" in wrong.err and "MATRIXJOBS_API_TOKEN" in wrong.err
    right = await run_cli(svc.url, "submit", "quick", "--wait", token=TOKEN)
    assert right.code == 0, right


# -- logs ---------------------------------------------------------------------------------------


async def test_logs_prints_the_whole_log_and_unknown_ids_exit_1(svc):
    job = await svc.app.submit("fail")
    await final_state(svc.app, job.id)
    result = await run_cli(svc.url, "logs", job.id)
    assert result.code == 0, result
    assert result.out == await svc.app.log(job.id)
    assert result.lines[1:] == ["::progress 1/2 half way", "── failed: exit code 3 ──"]
    missing = await run_cli(svc.url, "logs", "j999")
    assert missing.code == 1 and "no job j999" in missing.err, missing


async def test_logs_follow_prints_output_until_the_job_ends(svc):
    job = await svc.app.submit("count", ["10"])
    result = await run_cli(svc.url, "logs", job.id, "-f")
    assert result.code == 0, result
    assert result.lines[-2:] == ["::progress 10/10 step 10", "── completed ──"]
    assert (await svc.app.status(job.id)).status == "completed"

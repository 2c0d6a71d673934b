"""The built-in `command` handler, end to end: real subprocesses run by a running App.

Each test configures targets that run small Python scripts, submits jobs through
the App and asserts on what a user sees: the final event's status, error text,
message and progress numbers (plus, where noted, the stored result's output).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from containment import gone_within, kill_marked, marked, new_marker
from helpers import final_state, make_config, python_target

from matrixjobs.app import App
from matrixjobs.errors import BadArgumentsError, UnknownTargetError
from matrixjobs.models import Status
from matrixjobs.progress.reporter import ProgressReporter
from matrixjobs.queue.command import LINE_LIMIT, TAIL_LINES, OutputParser

FAST_KILL = {"kill_grace_s": 0.5}


def config(tmp_path: Path, **targets):
    return make_config(tmp_path, queue=FAST_KILL, targets=targets)


async def run_to_end(running_app, tmp_path: Path, timeout: float = 15.0, **targets):
    """Start an App with `targets`, submit the only one, return (app, job, final event)."""
    (name,) = targets
    app = await running_app(config(tmp_path, **targets))
    job = await app.submit(name)
    return app, job, await final_state(app, job.id, timeout=timeout)


@pytest.fixture
def marker() -> Iterator[str]:
    """A token in the command lines of a test's job processes, to find them from outside
    (inside its PID namespace a job's own pids mean nothing here)."""
    found = new_marker()
    yield found
    kill_marked(found)


async def running_marked(marker: str, app: App | None = None, job_id: str | None = None,
                         message: str | None = None, timeout: float = 10.0) -> None:
    """Wait until a process with `marker` runs (and, with `message`, the job says it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        said = message is None or (app is not None and job_id is not None
                                   and (await app.status(job_id)).message == message)
        if said and marked(marker):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no process with {marker} (and message {message!r}) in {timeout}s")


# -- progress from the output ------------------------------------------------------------------


async def test_progress_line_with_count_sets_current_total_percentage_and_message(
    tmp_path, running_app
):
    code = """
        print("starting")
        print("::progress 3/10 copying files")
    """
    _, _, final = await run_to_end(running_app, tmp_path, t=python_target(code))
    assert final.status == Status.COMPLETED
    assert final.progress is not None
    assert (final.progress.current, final.progress.total) == (3, 10)
    assert final.progress.percentage == 30.0
    assert final.message == "copying files"


async def test_progress_line_with_percent_means_out_of_100(tmp_path, running_app):
    code = """
        print("::progress 40%")
    """
    _, _, final = await run_to_end(running_app, tmp_path, t=python_target(code))
    assert final.status == Status.COMPLETED
    assert final.progress is not None
    assert (final.progress.current, final.progress.total) == (40, 100)
    assert final.progress.percentage == 40.0
    assert final.message is None


async def test_percent_progress_line_carries_its_message(tmp_path, running_app):
    code = """
        print("::progress 12.5% indexing")
    """
    _, _, final = await run_to_end(running_app, tmp_path, t=python_target(code))
    assert final.progress is not None
    assert final.progress.percentage == 12.5
    assert final.message == "indexing"


async def test_target_progress_regex_with_named_groups_is_honoured(tmp_path, running_app):
    code = """
        print("Step 1 of 8: fetching")
        print("Step 2 of 8: compiling sources")
        print("some other output")
    """
    target = python_target(
        code,
        progress_regex=r"^Step (?P<current>\d+) of (?P<total>\d+): (?P<message>.+)$",
    )
    _, _, final = await run_to_end(running_app, tmp_path, t=target)
    assert final.status == Status.COMPLETED
    assert final.progress is not None
    assert (final.progress.current, final.progress.total) == (2, 8)
    assert final.progress.percentage == 25.0
    assert final.message == "compiling sources"


async def test_carriage_return_redraws_are_split_into_separate_lines(tmp_path, running_app):
    code = r"""
        import sys
        for i in range(1, 4):
            sys.stdout.write(f"::progress {i}/4 frame {i}\r")
            sys.stdout.flush()
        sys.stdout.write("\r\n")
    """
    _, _, final = await run_to_end(running_app, tmp_path, t=python_target(code))
    assert final.status == Status.COMPLETED
    assert final.progress is not None
    # Unsplit, the first "line" would be "::progress 1/4 frame 1\r::progress 2/4 ...".
    assert (final.progress.current, final.progress.total) == (3, 4)
    assert final.message == "frame 3"


async def test_carriage_return_redraws_show_as_separate_tail_lines_on_failure(
    tmp_path, running_app
):
    code = r"""
        import sys
        sys.stdout.write("downloading 10%\rdownloading 50%\rdownloading 100%\r\nfailed\n")
        sys.exit(2)
    """
    _, _, final = await run_to_end(
        running_app, tmp_path, t=python_target(code, max_retries=0)
    )
    assert final.status == Status.FAILED
    assert final.error is not None
    assert final.error.splitlines() == [
        "exit code 2", "downloading 10%", "downloading 50%", "downloading 100%", "failed",
    ]


# -- odd progress ------------------------------------------------------------------------------


async def test_garbage_progress_lines_do_not_fail_the_job_and_stay_in_the_output(
    tmp_path, running_app
):
    code = """
        print("::progress 2/5 good")
        print("::progress abc/def")
        print("::progress 1/")
        print("::progress")
    """
    app, job, final = await run_to_end(running_app, tmp_path, t=python_target(code))
    assert final.status == Status.COMPLETED
    assert final.error is None
    # The last good report stays.
    assert final.progress is not None
    assert (final.progress.current, final.progress.total) == (2, 5)
    assert final.message == "good"
    (stored,) = await app.jobs()
    assert stored.id == job.id
    assert stored.result["exitCode"] == 0
    assert stored.result["output"] == ["::progress abc/def", "::progress 1/", "::progress"]


async def test_garbage_progress_lines_show_up_in_the_failure_tail(tmp_path, running_app):
    code = """
        import sys
        print("::progress abc/def")
        print("::progress 1/")
        sys.exit(1)
    """
    _, _, final = await run_to_end(
        running_app, tmp_path, t=python_target(code, max_retries=0)
    )
    assert final.status == Status.FAILED
    assert final.error is not None
    assert final.error.splitlines() == ["exit code 1", "::progress abc/def", "::progress 1/"]


async def test_total_zero_gives_progress_without_percentage_and_job_completes(
    tmp_path, running_app
):
    code = """
        print("::progress 5/0 counting, total unknown")
    """
    _, _, final = await run_to_end(running_app, tmp_path, t=python_target(code))
    assert final.status == Status.COMPLETED
    assert final.progress is not None
    assert final.progress.current == 5
    assert final.progress.total is None
    assert final.progress.percentage is None
    assert final.message == "counting, total unknown"


async def test_current_above_total_is_clamped_to_100_percent(tmp_path, running_app):
    code = """
        print("::progress 15/10 overshoot")
    """
    _, _, final = await run_to_end(running_app, tmp_path, t=python_target(code))
    assert final.status == Status.COMPLETED
    assert final.progress is not None
    assert final.progress.percentage == 100.0
    assert final.message == "overshoot"


async def test_builtin_progress_lines_never_appear_in_the_failure_tail(tmp_path, running_app):
    code = """
        import sys
        for i in range(30):
            print(f"::progress {i}/30 step {i}")
            if i % 10 == 0:
                print(f"note {i}")
        print("::progress 50% almost")
        print("boom")
        sys.exit(4)
    """
    _, _, final = await run_to_end(
        running_app, tmp_path, t=python_target(code, max_retries=0)
    )
    assert final.status == Status.FAILED
    assert final.error is not None
    assert "::progress" not in final.error
    assert final.error.splitlines() == ["exit code 4", "note 0", "note 10", "note 20", "boom"]
    # The progress itself was still taken.
    assert final.progress is not None and final.progress.percentage == 50.0


async def test_regex_progress_lines_never_appear_in_the_failure_tail(tmp_path, running_app):
    code = """
        import sys
        print("real problem: disk full")
        for i in range(1, 31):
            print(f"Step {i} of 30")
        sys.exit(1)
    """
    target = python_target(
        code, max_retries=0, progress_regex=r"^Step (?P<current>\d+) of (?P<total>\d+)$"
    )
    _, _, final = await run_to_end(running_app, tmp_path, t=target)
    assert final.status == Status.FAILED
    assert final.progress is not None
    assert (final.progress.current, final.progress.total) == (30, 30)
    assert final.error is not None
    # Thirty progress lines must not push the real error out of the 20-line tail.
    assert final.error.splitlines() == ["exit code 1", "real problem: disk full"]


# -- failures ----------------------------------------------------------------------------------


async def test_nonzero_exit_fails_with_exit_code_and_only_the_last_20_output_lines(
    tmp_path, running_app
):
    code = """
        import sys
        for i in range(1, 51):
            print(f"line {i}")
        sys.exit(3)
    """
    _, _, final = await run_to_end(
        running_app, tmp_path, t=python_target(code, max_retries=0)
    )
    assert final.status == Status.FAILED
    assert final.error is not None
    assert final.error.startswith("exit code 3\n")
    assert TAIL_LINES == 20
    assert final.error.splitlines() == ["exit code 3", *(f"line {i}" for i in range(31, 51))]
    assert "line 30\n" not in final.error + "\n"


async def test_output_on_stderr_is_part_of_the_failure_tail(tmp_path, running_app):
    code = """
        import sys
        print("to stdout", flush=True)
        print("Traceback: to stderr", file=sys.stderr, flush=True)
        sys.exit(1)
    """
    _, _, final = await run_to_end(
        running_app, tmp_path, t=python_target(code, max_retries=0)
    )
    assert final.error is not None
    assert final.error.splitlines() == ["exit code 1", "to stdout", "Traceback: to stderr"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
async def test_command_killed_by_a_signal_fails_naming_the_signal(tmp_path, running_app, sig):
    code = f"""
        import os
        print("about to die", flush=True)
        os.kill(os.getpid(), {int(sig)})
    """
    _, _, final = await run_to_end(
        running_app, tmp_path, t=python_target(code, max_retries=0)
    )
    assert final.status == Status.FAILED
    assert final.error is not None
    assert final.error.splitlines() == [f"killed by {sig.name}", "about to die"]


async def test_failing_command_with_one_retry_runs_twice_then_fails_with_retry_count_1(
    tmp_path, running_app
):
    runs = tmp_path / "runs.txt"
    code = f"""
        import sys
        with open({str(runs)!r}, "a") as f:
            f.write("run\\n")
        print("nope")
        sys.exit(7)
    """
    _, _, final = await run_to_end(
        running_app, tmp_path, t=python_target(code, max_retries=1)
    )
    assert final.status == Status.FAILED
    assert final.error == "exit code 7\nnope"
    assert final.job_details is not None
    assert final.job_details.retry_count == 1
    assert final.job_details.max_retries == 1
    assert '"retryCount":1' in final.to_json()
    assert runs.read_text().splitlines() == ["run", "run"]


async def test_missing_executable_fails_at_once_without_retries(tmp_path, running_app):
    missing = str(tmp_path / "no-such-program")
    target = {"command": [missing, "--flag"], "max_retries": 3}
    _, _, final = await run_to_end(running_app, tmp_path, t=target)
    assert final.status == Status.FAILED
    assert final.error is not None
    assert final.error == f"executable '{missing}' not found"
    assert missing in final.error
    assert final.job_details is not None
    assert final.job_details.retry_count == 0


async def test_missing_executable_on_path_fails_without_retries(tmp_path, running_app):
    target = {"command": ["matrixjobs-no-such-program-xyz"], "max_retries": 2}
    _, _, final = await run_to_end(running_app, tmp_path, t=target)
    assert final.status == Status.FAILED
    assert final.error == "executable 'matrixjobs-no-such-program-xyz' not found on PATH"
    assert final.job_details is not None and final.job_details.retry_count == 0


async def test_missing_working_directory_fails_without_running_or_retrying(
    tmp_path, running_app
):
    runs = tmp_path / "runs.txt"
    missing = tmp_path / "not-there"
    code = f"""
        open({str(runs)!r}, "a").write("run\\n")
    """
    target = python_target(code, cwd=str(missing), max_retries=2)
    _, _, final = await run_to_end(running_app, tmp_path, t=target)
    assert final.status == Status.FAILED
    assert final.error is not None
    assert final.error.startswith("working directory not found")
    assert str(missing) in final.error
    assert final.job_details is not None and final.job_details.retry_count == 0
    assert not runs.exists()


async def test_existing_working_directory_is_used(tmp_path, running_app):
    workdir = tmp_path / "work"
    workdir.mkdir()
    code = """
        import os
        print("::progress 1/1 " + os.getcwd())
    """
    _, _, final = await run_to_end(
        running_app, tmp_path, t=python_target(code, cwd=str(workdir))
    )
    assert final.status == Status.COMPLETED
    assert final.message == str(workdir.resolve())


# -- arguments ---------------------------------------------------------------------------------

PRINT_ARGV = """
    import json, sys
    print("::progress 1/1 " + json.dumps(sys.argv[1:]))
"""


async def test_target_without_args_pattern_refuses_any_argument_and_enqueues_nothing(
    tmp_path, running_app
):
    app = await running_app(config(tmp_path, t=python_target(PRINT_ARGV)))
    with pytest.raises(BadArgumentsError, match="takes no arguments"):
        await app.submit("t", ["x"])
    assert await app.jobs() == []


async def test_argument_not_matching_the_pattern_is_refused_at_submit(tmp_path, running_app):
    app = await running_app(
        config(tmp_path, t=python_target(PRINT_ARGV, args_pattern=r"[a-z0-9-]+"))
    )
    with pytest.raises(BadArgumentsError, match="not allowed") as caught:
        await app.submit("t", ["ok", "a;echo pwned"])
    assert "a;echo pwned" in str(caught.value)
    # The whole argument must match, not a prefix of it.
    with pytest.raises(BadArgumentsError):
        await app.submit("t", ["abc def"])
    assert await app.jobs() == []


async def test_matching_arguments_arrive_as_separate_argv_entries(tmp_path, running_app):
    app = await running_app(
        config(tmp_path, t=python_target(PRINT_ARGV, args_pattern=r"[a-z0-9 -]+"))
    )
    job = await app.submit("t", ["alpha", "two words", "-x"])
    final = await final_state(app, job.id)
    assert final.status == Status.COMPLETED
    assert json.loads(final.message or "null") == ["alpha", "two words", "-x"]


async def test_permissive_pattern_passes_shell_syntax_literally_without_a_shell(
    tmp_path, running_app
):
    app = await running_app(config(tmp_path, t=python_target(PRINT_ARGV, args_pattern=".*")))
    args = ["$(id)", "a;echo pwned", "`whoami`", "x | cat", "*"]
    job = await app.submit("t", args)
    final = await final_state(app, job.id)
    assert final.status == Status.COMPLETED
    assert json.loads(final.message or "null") == args
    assert "uid=" not in (final.message or "")


async def test_unknown_target_is_refused_listing_the_available_ones(tmp_path, running_app):
    app = await running_app(
        config(tmp_path, beta=python_target("pass"), alpha=python_target("pass"))
    )
    with pytest.raises(UnknownTargetError) as caught:
        await app.submit("gamma")
    assert caught.value.available == ["alpha", "beta"]
    assert str(caught.value) == "unknown target 'gamma' (available: alpha, beta)"
    assert await app.jobs() == []


# -- environment -------------------------------------------------------------------------------


async def test_target_env_and_job_id_reach_the_process_but_service_secrets_do_not(
    tmp_path, running_app, monkeypatch
):
    monkeypatch.setenv("MATRIXJOBS_PASSWORD", "hunter2")
    monkeypatch.setenv("MATRIXJOBS_ACCESS_TOKEN", "syt_secret")
    monkeypatch.setenv("MATRIXJOBS_API_TOKEN", "api-secret")
    monkeypatch.setenv("MATRIXJOBS_TEST_PLAIN", "inherited")
    code = """
        import json, os
        keys = ["GREETING", "MATRIXJOBS_JOB_ID", "MATRIXJOBS_TEST_PLAIN",
                "MATRIXJOBS_PASSWORD", "MATRIXJOBS_ACCESS_TOKEN", "MATRIXJOBS_API_TOKEN"]
        print("::progress 1/1 " + json.dumps({k: os.environ.get(k) for k in keys}))
    """
    app = await running_app(
        config(tmp_path, t=python_target(code, env={"GREETING": "hello world"}))
    )
    job = await app.submit("t")
    final = await final_state(app, job.id)
    assert final.status == Status.COMPLETED
    seen = json.loads(final.message or "null")
    assert seen == {
        "GREETING": "hello world",
        "MATRIXJOBS_JOB_ID": job.id,
        "MATRIXJOBS_TEST_PLAIN": "inherited",
        "MATRIXJOBS_PASSWORD": None,
        "MATRIXJOBS_ACCESS_TOKEN": None,
        "MATRIXJOBS_API_TOKEN": None,
    }


async def test_each_job_sees_its_own_job_id(tmp_path, running_app):
    code = """
        import os
        print("::progress 1/1 " + os.environ["MATRIXJOBS_JOB_ID"])
    """
    app = await running_app(config(tmp_path, t=python_target(code)))
    first = await app.submit("t")
    second = await app.submit("t")
    assert first.id != second.id
    assert (await final_state(app, first.id)).message == first.id
    assert (await final_state(app, second.id)).message == second.id


# -- timeout and cancel ------------------------------------------------------------------------


async def test_timeout_fails_the_job_and_kills_the_process(tmp_path, running_app, marker):
    code = f"import time\ntime.sleep(30)  # {marker}\n"
    target = python_target(code, timeout_s=0.5, max_retries=0)
    app = await running_app(config(tmp_path, t=target))
    job = await app.submit("t")
    await running_marked(marker)
    final = await final_state(app, job.id, timeout=10)
    assert final.status == Status.FAILED
    assert final.error == "timed out after 0.5s"
    gone_within(marker, 3)


async def test_cancel_terminates_the_whole_process_group(tmp_path, running_app, marker):
    code = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)  "
        f"# {marker}'])\n"
        "print('::progress 1/2 waiting', flush=True)\n"
        f"time.sleep(60)  # {marker}\n"
    )
    app = await running_app(config(tmp_path, t=python_target(code)))
    job = await app.submit("t")
    await running_marked(marker, app, job.id, message="waiting")
    cancelled = await asyncio.wait_for(app.cancel(job.id), 10)
    assert cancelled.status == Status.CANCELLED
    final = await app.status(job.id)
    assert final.status == Status.CANCELLED
    assert final.error is None
    gone_within(marker, 3)


async def test_cancel_sigkills_a_command_that_ignores_sigterm_after_the_grace(
    tmp_path, running_app, marker
):
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('::progress 1/2 ignoring SIGTERM', flush=True)\n"
        f"time.sleep(60)  # {marker}\n"
    )
    app = await running_app(config(tmp_path, t=python_target(code)))
    job = await app.submit("t")
    await running_marked(marker, app, job.id, message="ignoring SIGTERM")
    started = time.monotonic()
    cancelled = await asyncio.wait_for(app.cancel(job.id), 10)
    elapsed = time.monotonic() - started
    assert cancelled.status == Status.CANCELLED
    gone_within(marker, 3)
    # It survived SIGTERM, so it took about the grace period (0.5 s) to go.
    assert 0.4 <= elapsed < 5, elapsed


async def test_command_that_exits_but_leaves_a_grandchild_holding_stdout_completes_promptly(
    tmp_path, running_app, marker
):
    code = (
        "import subprocess, sys\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)  "
        f"# {marker}'])\n"
        "print('::progress 1/1 left a daemon behind', flush=True)\n"
    )
    app = await running_app(config(tmp_path, t=python_target(code)))
    started = time.monotonic()
    job = await app.submit("t")
    try:
        final = await final_state(app, job.id, timeout=6)
    except TimeoutError:
        pytest.fail("job still not finished 6 s after its command exited "
                    "(waiting for the grandchild to close stdout)")
    assert final.status == Status.COMPLETED
    assert final.message == "left a daemon behind"
    assert time.monotonic() - started < 5.5
    gone_within(marker, 1)  # the job's end is the end of all it started


async def test_cancel_is_prompt_when_a_grandchild_left_the_group_holding_stdout(
    tmp_path, running_app, marker
):
    """A daemon that called setsid() is out of reach of the group signals; the job
    still ends at once when its own process dies, and the daemon with it."""
    code = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)  "
        f"# {marker}'], start_new_session=True)\n"
        "print('::progress 1/2 daemon started', flush=True)\n"
        f"time.sleep(60)  # {marker}\n"
    )
    app = await running_app(make_config(tmp_path, queue={"kill_grace_s": 5.0},
                                        targets={"t": python_target(code)}))
    job = await app.submit("t")
    await running_marked(marker, app, job.id, message="daemon started")
    started = time.monotonic()
    cancelled = await asyncio.wait_for(app.cancel(job.id), 10)
    assert cancelled.status == Status.CANCELLED
    # The leader dies of SIGTERM at once: no waiting out the kill grace (5 s here)
    # for a pipe the escaped grandchild keeps open.
    assert time.monotonic() - started < 3
    gone_within(marker, 1)


# -- awkward output ----------------------------------------------------------------------------


async def test_very_long_line_without_newline_does_not_break_parsing(tmp_path, running_app):
    code = """
        import sys
        sys.stdout.write("x" * 200_000)
        sys.stdout.flush()
        sys.stdout.write("\\n::progress 7/10 after the long line\\n")
        print("the end")
        sys.exit(5)
    """
    _, _, final = await run_to_end(
        running_app, tmp_path, t=python_target(code, max_retries=0)
    )
    assert final.status == Status.FAILED
    assert final.progress is not None
    assert (final.progress.current, final.progress.total) == (7, 10)
    assert final.message == "after the long line"
    assert final.error is not None
    lines = final.error.splitlines()
    assert lines[0] == "exit code 5"
    assert lines[-1] == "the end"
    assert all(set(line) == {"x"} for line in lines[1:-1])
    assert all(len(line) <= LINE_LIMIT for line in lines)


async def test_200kb_output_without_any_newline_completes(tmp_path, running_app):
    code = """
        import sys
        sys.stdout.write("y" * 200_000)
    """
    app, job, final = await run_to_end(running_app, tmp_path, t=python_target(code))
    assert final.status == Status.COMPLETED
    (stored,) = await app.jobs()
    assert stored.id == job.id
    assert stored.result["output"]
    assert all(set(line) == {"y"} and len(line) <= LINE_LIMIT
               for line in stored.result["output"])


async def test_multibyte_characters_split_across_read_chunks_arrive_intact(
    tmp_path, running_app
):
    # The output is one write of 65536 - 1 bytes of ASCII lines and then 20 lines of "€"
    # (3 bytes each): the 64 KiB read boundary falls inside a "€".
    code = r"""
        import os, sys
        euro = ("\u20ac" * 100 + "\n").encode()
        filler_len = 65536 - len(euro) * 10 - 1
        filler = (b"a" * 99 + b"\n") * (filler_len // 100)
        filler += b"b" * (filler_len % 100 - 1) + b"\n"
        view = memoryview(filler + euro * 20)
        while view:
            view = view[os.write(1, view):]
        sys.exit(1)
    """
    _, _, final = await run_to_end(
        running_app, tmp_path, t=python_target(code, max_retries=0)
    )
    assert final.status == Status.FAILED
    assert final.error is not None
    assert "\ufffd" not in final.error
    assert final.error.splitlines() == ["exit code 1", *["\u20ac" * 100] * 20]


async def test_invalid_utf8_output_does_not_break_the_job(tmp_path, running_app):
    code = r"""
        import os
        os.write(1, b"bad \xff\xfe bytes\n::progress 1/2 still parsed\n")
    """
    _, _, final = await run_to_end(running_app, tmp_path, t=python_target(code))
    assert final.status == Status.COMPLETED
    assert final.message == "still parsed"


# -- OutputParser on its own -------------------------------------------------------------------


def parser(pattern: str | None = None) -> tuple[OutputParser, ProgressReporter]:
    reporter = ProgressReporter()
    return OutputParser(reporter, re.compile(pattern) if pattern else None), reporter


def test_parser_reports_a_progress_line_split_across_chunks():
    p, reporter = parser()
    p.feed("::progr")
    assert reporter.state is None
    p.feed("ess 3/1")
    p.feed("0 msg here\n")
    assert reporter.state == (3.0, 10.0, "msg here")
    assert list(p.tail) == []


def test_parser_splits_on_cr_and_crlf_and_skips_blank_lines():
    p, reporter = parser()
    p.feed("a\rb\r\nc\n\r\n  \nd")
    assert list(p.tail) == ["a", "b", "c"]
    p.close()
    assert list(p.tail) == ["a", "b", "c", "d"]
    assert reporter.state is None


def test_parser_keeps_garbage_progress_in_the_tail_and_the_last_good_report():
    p, reporter = parser()
    p.feed("::progress 1/4 ok\n::progress abc/def\n::progress 1/\n::progress x%\n")
    assert reporter.state == (1.0, 4.0, "ok")
    assert list(p.tail) == ["::progress abc/def", "::progress 1/", "::progress x%"]


def test_parser_percent_and_regex_progress():
    p, reporter = parser(r"(?P<current>\d+)/(?P<total>\d+) files(?: (?P<message>.*))?")
    p.feed("::progress 40%\n")
    assert reporter.state == (40.0, 100.0, None)
    p.feed("copied 3/12 files report.pdf\n")
    assert reporter.state == (3.0, 12.0, "report.pdf")


def test_parser_survives_a_200kb_line_without_newline():
    p, reporter = parser()
    for _ in range(50):
        p.feed("z" * 4000)
    p.feed("\n::progress 9/10 done\n")
    p.close()
    assert reporter.state == (9.0, 10.0, "done")
    assert p.tail and all(len(line) <= LINE_LIMIT for line in p.tail)
    assert all(set(line) == {"z"} for line in p.tail)


def test_parser_tail_holds_only_the_last_20_lines():
    p, _ = parser()
    p.feed("".join(f"line {i}\n" for i in range(100)))
    assert list(p.tail) == [f"line {i}" for i in range(80, 100)]


def test_parser_matches_progress_only_in_a_long_lines_start_so_backtracking_stays_short():
    # Unbounded, this pattern backtracks over every digit run: ~4 s for this one line.
    p, reporter = parser(r"(?P<current>\d+)\s*/\s*(?P<total>\d+)")
    started = time.monotonic()
    p.feed("1" * 20_000 + "\n")
    p.feed("copied 3/12 " + "x" * 20_000 + "\n")
    assert time.monotonic() - started < 0.5
    assert reporter.state == (3.0, 12.0, None)
    assert list(p.tail) == ["1" * LINE_LIMIT]

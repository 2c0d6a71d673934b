"""Job logs: each run's whole output kept in order, masked, capped, followed live."""

from __future__ import annotations

import asyncio
import time
import tracemalloc

import pytest
from helpers import final_state, make_config, python_target

from matrixjobs.errors import NotFoundError
from matrixjobs.logs import MASK, mask
from matrixjobs.models import Job, JobSpec, Status
from matrixjobs.queue.handlers import HandlerRegistry
from matrixjobs.queue.joblog import PIECE_CHARS, RunLog

SECRET = "hunter2-very-secret"
MIB = 1024 * 1024


def run_log(max_bytes: int = 65536) -> RunLog:
    return RunLog(lambda: "── attempt 1 of 1 ──", max_bytes,
                  lambda text: text.replace(SECRET, MASK))


def test_a_run_over_the_cap_keeps_its_head_and_tail_and_says_what_was_cut():
    log = run_log()
    for number in range(10_000):
        log.write(f"line {number}\n")
    log.close("failed: exit code 1")
    text = log.text()
    assert len(text.encode()) <= 65536
    lines = text.splitlines()
    assert lines[:3] == ["── attempt 1 of 1 ──", "line 0", "line 1"]
    assert lines[-2:] == ["line 9999", "── failed: exit code 1 ──"]
    [note] = [line for line in lines if "cut" in line]
    kept = {int(line.split()[1]) for line in lines if line.startswith("line ")}
    cut = set(range(10_000)) - kept
    assert cut == set(range(min(cut), max(cut) + 1))  # one gap, in the middle
    assert f"({len(cut)} lines)" in note
    cut_bytes = sum(len(f"line {n}") + 1 for n in cut)
    assert f"{cut_bytes} bytes" in note


def test_earlier_attempts_lose_their_oldest_part_first():
    log = run_log()
    log.earlier = "".join(f"old {n}\n" for n in range(10_000))
    log.write("new run\n")
    text = log.text()
    assert len(text.encode()) <= 65536
    assert text.startswith("── ") and "of earlier attempts cut" in text.splitlines()[0]
    assert "old 9999\n── attempt 1 of 1 ──\nnew run\n" in text
    assert "old 0\n" not in text


def test_a_secret_split_across_two_reads_is_masked():
    log = run_log()
    log.write(f"token={SECRET[:7]}")
    log.write(f"{SECRET[7:]} ok\n")
    assert SECRET not in log.text() and f"token={MASK} ok" in log.text()


def test_a_line_without_end_is_cut_into_pieces_as_it_comes():
    log = run_log(MIB)
    log.write("x" * (PIECE_CHARS * 3 + 10))
    # The header and two pieces so far: the last HOLDBACK_CHARS and more wait for output.
    assert log.text().count("\n") == 1 + 2
    log.close(None)
    assert [len(line) for line in log.text().splitlines()[1:]] == [PIECE_CHARS] * 3 + [10]


def test_a_secret_in_a_line_longer_than_a_piece_is_masked_wherever_it_falls():
    for offset in (PIECE_CHARS - 5, PIECE_CHARS * 2 - 3):
        log = run_log(MIB)
        line = "x" * offset + SECRET + "y" * 5000
        log.write(line[:PIECE_CHARS + 100])  # arrives in two writes, then ends
        log.write(line[PIECE_CHARS + 100:] + "\n")
        log.close(None)
        assert SECRET not in log.text().replace("\n", "")
        assert MASK in log.text()
        unended = run_log(MIB)  # and the same line still coming, not yet ended
        unended.write(line[:PIECE_CHARS + 300])
        unended.write(line[PIECE_CHARS + 300:])
        assert SECRET not in unended.text().replace("\n", "")


def test_a_silent_run_has_no_log():
    log = run_log()
    log.close(None)
    assert log.empty and log.text() == ""


async def test_output_without_a_final_newline_is_kept_when_the_job_succeeds(tmp_path,
                                                                           running_app):
    app = await running_app(make_config(tmp_path, targets={
        "terse": python_target("import sys; sys.stdout.write('done, no newline')")}))
    job = await app.submit("terse")
    assert (await final_state(app, job.id)).status == Status.COMPLETED
    assert "done, no newline\n── completed ──" in await app.log(job.id)


async def test_a_follower_gets_what_came_before_and_after_it_joined_then_the_end():
    log = run_log()
    log.write("before\n")
    text, follower = log.follow()
    log.write("after\n")
    log.close("completed")
    chunks = [chunk async for chunk in follower.chunks()]
    assert text.endswith("before\n")
    assert "".join(chunks) == "after\n── completed ──\n"


# -- through a running App --------------------------------------------------------------------

FLAKY = python_target("""
    import os, sys
    print("to stdout", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    print("stdout again", flush=True)
    sys.exit(3)
""", max_retries=1)


async def test_each_attempt_is_logged_in_order_with_stderr_interleaved(tmp_path, running_app):
    app = await running_app(make_config(tmp_path, targets={"flaky": FLAKY}))
    job = await app.submit("flaky")
    assert (await final_state(app, job.id)).status == Status.FAILED
    lines = (await app.log(job.id)).splitlines()
    assert lines[0].startswith("── attempt 1 of 2 · ")
    assert lines[1:5] == ["to stdout", "to stderr", "stdout again",
                          "── failed: exit code 3; it runs again ──"]
    assert lines[5].startswith("── attempt 2 of 2 · ")
    assert lines[6:] == ["to stdout", "to stderr", "stdout again", "── failed: exit code 3 ──"]


async def test_binary_output_is_replaced_not_a_crash(tmp_path, running_app):
    target = python_target(r"""
        import sys
        sys.stdout.buffer.write(b"ok \xff\xfe bytes\n\x00end\n")
    """)
    app = await running_app(make_config(tmp_path, targets={"bin": target}))
    job = await app.submit("bin")
    assert (await final_state(app, job.id)).status == Status.COMPLETED
    assert "ok \ufffd\ufffd bytes\n\x00end\n── completed ──" in await app.log(job.id)


async def test_a_log_of_an_unknown_job_is_not_found(tmp_path, running_app):
    app = await running_app(make_config(tmp_path))
    with pytest.raises(NotFoundError):
        await app.log("j999")
    with pytest.raises(NotFoundError):
        await anext(app.follow_log("j999"))
    with pytest.raises(NotFoundError):
        await app.log("b1")


class Chatty:
    """A Python handler that writes to its log, then fails with a traceback."""

    async def run(self, job: Job, progress) -> None:
        progress.log("handler says hi\n")
        raise ValueError("broken on purpose")


async def test_a_python_handler_writes_to_its_log_and_its_traceback_lands_there(
    tmp_path, running_app
):
    handlers = HandlerRegistry()
    handlers.register("chatty", Chatty())
    app = await running_app(make_config(tmp_path, queue={"max_retries": 0}), handlers=handlers)
    job = await app.queue.enqueue(JobSpec(type="chatty", data={}, name="chatty"))
    await final_state(app, job.id)
    text = await app.log(job.id)
    assert "handler says hi\nTraceback (most recent call last):\n" in text
    assert text.endswith(
        "ValueError: broken on purpose\n── failed: ValueError: broken on purpose ──\n")


GATED = python_target("""
    import pathlib, sys, time
    print("started", flush=True)
    while not pathlib.Path(sys.argv[1]).exists():
        time.sleep(0.02)
    print("finishing", flush=True)
""", args_pattern=".+")


async def test_follow_waits_for_a_pending_job_and_ends_when_it_ends(tmp_path, running_app):
    app = await running_app(make_config(tmp_path, queue={"workers": 1},
                                         targets={"gated": GATED}))
    gate1, gate2 = tmp_path / "gate1", tmp_path / "gate2"
    first = await app.submit("gated", [str(gate1)])
    second = await app.submit("gated", [str(gate2)])
    follow = app.follow_log(second.id)
    assert await anext(follow) == ""  # the job exists; it has not started

    async def read_all() -> str:
        return "".join([chunk async for chunk in follow])

    reader = asyncio.create_task(read_all())
    await asyncio.sleep(0.3)
    assert not reader.done()  # waits while `first` holds the only worker
    gate1.touch()
    await asyncio.sleep(0.3)
    assert not reader.done()  # `second` runs now
    gate2.touch()
    text = await asyncio.wait_for(reader, 10)
    assert text.splitlines()[1:] == ["started", "finishing", "── completed ──"]
    assert (await app.store.get_job(first.id)).status == Status.COMPLETED


async def test_a_follower_gets_a_run_that_started_while_it_read_the_store_at_once(
    tmp_path, running_app
):
    """The run starts between the follower's look at the live logs and its wait for a
    start: it must not sleep out the recheck interval (1 s) before following it."""
    app = await running_app(make_config(tmp_path, queue={"workers": 1},
                                         targets={"gated": GATED}))
    gate1, gate2 = tmp_path / "gate1", tmp_path / "gate2"
    await app.submit("gated", [str(gate1)])
    second = await app.submit("gated", [str(gate2)])
    read_job = app.store.get_job
    reads = 0

    async def read_while_it_starts(job_id: str) -> Job | None:
        nonlocal reads
        reads += 1
        job = await read_job(job_id)  # still pending, as the follower then believes
        if reads == 2:
            gate1.touch()  # the first job ends and `second` starts meanwhile
            while app.job_logs.live(job_id) is None:
                await asyncio.sleep(0.01)
        return job

    app.store.get_job = read_while_it_starts
    follow = app.follow_log(second.id)
    assert await anext(follow) == ""
    began = time.monotonic()
    started = await anext(follow)  # what it wrote so far: at least its attempt's header
    while "started" not in started:
        started += await anext(follow)
    assert time.monotonic() - began < 0.5
    gate2.touch()


async def test_a_follower_gets_a_run_that_started_and_ended_while_it_read_the_store_at_once(
    tmp_path, running_app
):
    """The whole run happens between the follower's look and its wait, and its outcome is
    not committed yet: the follower waits for that commit, not for a start (1 s)."""
    app = await running_app(make_config(tmp_path, queue={"workers": 1},
                                         targets={"gated": GATED}))
    gate1, gate2 = tmp_path / "gate1", tmp_path / "gate2"
    await app.submit("gated", [str(gate1)])
    second = await app.submit("gated", [str(gate2)])
    read_job = app.store.get_job
    reads = 0

    async def read_while_it_runs(job_id: str) -> Job | None:
        nonlocal reads
        reads += 1
        job = await read_job(job_id)  # still pending, as the follower then believes
        if reads == 2:
            gate1.touch()
            gate2.touch()  # `second` starts and ends meanwhile
            while not app.queue.settling(job_id):
                await asyncio.sleep(0.005)
        return job

    commit = app.store.settle_and_claim

    async def slow_commit(outcomes, *args):  # the outcome's commit takes 0.3 s
        if any(outcome.job_id == second.id for outcome in outcomes):
            await asyncio.sleep(0.3)
        return await commit(outcomes, *args)

    app.store.get_job = read_while_it_runs
    app.store.settle_and_claim = slow_commit
    follow = app.follow_log(second.id)
    assert await anext(follow) == ""
    began = time.monotonic()
    text = "".join([chunk async for chunk in follow])
    assert time.monotonic() - began < 0.8  # 0.3 s of commit, not a second's recheck
    assert text.splitlines()[1:] == ["started", "finishing", "── completed ──"]


async def test_follow_of_a_finished_job_gives_its_log_and_ends(tmp_path, running_app):
    app = await running_app(make_config(tmp_path, targets={"flaky": FLAKY}))
    job = await app.submit("flaky")
    await final_state(app, job.id)
    chunks = [chunk async for chunk in app.follow_log(job.id)]
    assert "".join(chunks) == await app.log(job.id) != ""


async def test_retention_deletes_the_log_with_its_job(tmp_path, running_app):
    app = await running_app(make_config(tmp_path, targets={"flaky": FLAKY}))
    job = await app.submit("flaky")
    await final_state(app, job.id)
    assert await app.store.get_log(job.id)
    await app.store.purge_finished(time.time() + 1)
    assert await app.store.get_log(job.id) is None
    async with app.store.db.execute("SELECT count(*) FROM job_logs") as cursor:
        assert (await cursor.fetchone())[0] == 0


FIFTY_MB = python_target("""
    import sys
    line = b"x" * 99 + b"\\n"
    block = line * 10_000  # 1 MB
    for _ in range(50):
        sys.stdout.buffer.write(block)
    sys.stdout.buffer.write(b"y" * 5_000_000)  # and 5 MB with no line end
    sys.stdout.buffer.write(b"\\nthe end\\n")
""", timeout_s=120)


async def test_fifty_mb_of_output_is_capped_and_memory_stays_flat(tmp_path, running_app):
    app = await running_app(make_config(tmp_path, targets={"big": FIFTY_MB}))
    tracemalloc.start()
    try:
        job = await app.submit("big")
        assert (await final_state(app, job.id, timeout=120)).status == Status.COMPLETED
        _, peak = tracemalloc.get_traced_memory()
        print(f"tracemalloc peak while 55 MB went through: {peak / MIB:.2f} MiB")
    finally:
        tracemalloc.stop()
    text = await app.log(job.id)
    assert len(text.encode()) <= MIB
    assert text.endswith("the end\n── completed ──\n")
    assert "of this attempt cut ──" in text
    assert peak < 12 * MIB, f"peak {peak / MIB:.1f} MiB while reading 55 MB of output"


async def test_a_known_secret_a_target_prints_is_masked_in_its_error_and_step_message(
        tmp_path, running_app):
    mask(["step-secret-4711-abcdef"])
    app = await running_app(make_config(tmp_path, queue={"max_retries": 0}, targets={
        "leak": python_target("""
            import sys, time
            print("::progress 1/2 token is step-secret-4711-abcdef", flush=True)
            time.sleep(0.3)
            print("my token step-secret-4711-abcdef", flush=True)
            sys.exit(1)
        """)}))
    job = await app.submit("leak")
    seen = [event async for event in app.watch(job.id)]
    assert seen[-1].status == Status.FAILED
    shown = " ".join(f"{event.message} {event.error}" for event in seen)
    assert "step-secret-4711-abcdef" not in shown
    assert f"my token {MASK}" in seen[-1].error and any(
        event.message == f"token is {MASK}" for event in seen)
    stored = await app.store.get_job(job.id)
    assert "step-secret-4711-abcdef" not in f"{stored.error} {stored.progress}"


async def test_a_silent_success_after_a_failed_attempt_closes_the_log_as_completed(
        tmp_path, running_app):
    app = await running_app(make_config(tmp_path, targets={"flaky": python_target(f"""
        import pathlib, sys
        marker = pathlib.Path({str(tmp_path / "ran-once")!r})
        if not marker.exists():
            marker.touch()
            print("first try breaks")
            sys.exit(1)
    """, max_retries=1)}))
    job = await app.submit("flaky")
    assert (await final_state(app, job.id)).status == Status.COMPLETED
    lines = (await app.log(job.id)).splitlines()
    assert lines[-1] == "── completed ──" and lines[-2].startswith("── attempt 2 of 2")
    assert "first try breaks" in lines

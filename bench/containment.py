"""What containing jobs in bubblewrap costs: contained vs uncontained, side by side.

Two modes, each an App on a fresh temporary directory (store, and the targets' working
directory) per mode and round, identical but for `[queue] containment`:
  contained    containment = "bubblewrap": every job runs in a bubblewrap sandbox (a PID,
               mount and user namespace of its own). The runner the App chose is checked
               and its enforcement mechanism printed; if bubblewrap cannot start here the
               bench says why and exits 2 (a fallback to process groups is never reported
               as a contained figure).
  uncontained  containment = "none": process groups only, the baseline.
The modes alternate, ABBA… (round 1: contained first, round 2: uncontained first, …), so
machine noise and warm-up hit both. Store settings are the defaults (WAL, synchronous=FULL:
every commit fsyncs), job logs are on (the default), no limits are configured.

1. Start latency, one job at a time (`--latency-jobs` per mode and round, after
   WARMUP_JOBS untimed ones). The target is `["echo", "hello"]`. The clock starts just
   before `app.submit("hello")` and stops when the bench, reading the job's live log like
   any follower, gets the chunk holding "hello". So it covers: the enqueue commit, the
   dispatcher waking and claiming the job (a second commit), the runner spawning the
   process (fork/exec of bwrap, its namespaces and /proc, then exec of echo; or plain
   fork/exec of echo), echo writing, the event loop reading the pipe, the log keeping the
   line, and the bench's task waking up. It does not cover the job's exit or its outcome's
   commit; the bench waits for those (store polled every POLL_S) before the next submit,
   so no two jobs overlap.
   The log is followed with `App.follow_log`, as `matrixjobs logs -f` follows it.
   Beside it, "spawn alone": the App's own runner (`runner.spawn`, the same argv jobs
   get) started directly `--latency-jobs` times, clocked from just before `spawn` to the
   first line read from its stdout: the part of the latency the runner is responsible for.
   Reported: p50 and p99 (linear interpolation) over all rounds' samples per mode, and the
   difference of the p50s ("added per job"; goal: <= 10 ms).
2. Throughput: `--jobs` jobs of a `["true"]` target enqueued at once (one `enqueue_many`,
   one commit) with `--workers` workers. The clock runs from just before the enqueue until
   every job's `completed` outcome is committed (the store is polled every POLL_S for jobs
   still pending or processing, so the end is late by at most that). Reported: jobs/s per
   mode (median of the rounds) and contained/uncontained (goal: >= 0.7).

Usage: python bench/containment.py [--latency-jobs 50] [--jobs 500] [--workers 4]
                                   [--rounds 2] [--dir DIR]

The last line printed is JSON only:
  {"contained_p50_ms", "uncontained_p50_ms", "added_p50_ms", "contained_p99_ms",
   "uncontained_p99_ms", "contained_jobs_s", "uncontained_jobs_s", "ratio",
   "contained_spawn_p50_ms", "uncontained_spawn_p50_ms", "mechanism", …}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from matrixjobs.app import App
from matrixjobs.config import SECRET_ENV, Config
from matrixjobs.errors import ConfigError
from matrixjobs.models import Status
from matrixjobs.queue.runner import GroupRunner, Launch, Runner
from matrixjobs.queue.sandbox import SandboxRunner
from matrixjobs.targets import COMMAND_TYPE

POLL_S = 0.005
WARMUP_JOBS = 3
TIMEOUT_S = 600.0
NEEDLE = "hello"
MODES = {"contained": "bubblewrap", "uncontained": "none"}
LATENCY_GOAL_MS = 10.0
RATIO_GOAL = 0.7


class CannotContain(Exception):
    """containment = "bubblewrap" did not give a bubblewrap runner."""


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def make_config(directory: Path, containment: str, workers: int) -> Config:
    work = directory / "work"
    work.mkdir()
    return Config.model_validate({
        "store": {"path": str(directory / "state" / "mj.db")},
        "queue": {"workers": workers, "containment": containment},
        "targets": {
            "hello": {"command": ["echo", NEEDLE], "cwd": str(work)},
            "true": {"command": ["true"], "cwd": str(work)},
        },
    })


def the_runner(app: App) -> Runner:
    runner = app.handlers.get(COMMAND_TYPE).runner  # type: ignore[attr-defined]
    assert runner is not None, "App.start() chose no runner"
    return runner


# -- 1. start latency ----------------------------------------------------------------------------


async def first_line(app: App, job_id: str) -> None:
    """Return once the job's log holds NEEDLE (followed as any interface follows it)."""
    async for chunk in app.follow_log(job_id):
        if NEEDLE in chunk:
            return
    raise RuntimeError(f"{job_id}'s run ended without a line holding {NEEDLE!r}")


async def settled(app: App, job_id: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        job = await app.store.get_job(job_id)
        assert job is not None
        if job.status.terminal:
            if job.status != Status.COMPLETED:
                raise RuntimeError(f"{job_id} {job.status}: {job.error}")
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{job_id} still {job.status} after {TIMEOUT_S}s")
        await asyncio.sleep(POLL_S)


async def start_latency(app: App, n: int) -> list[float]:
    samples = []
    for i in range(WARMUP_JOBS + n):
        start = time.perf_counter()
        job = await app.submit("hello")
        await asyncio.wait_for(first_line(app, job.id), TIMEOUT_S)
        seen = time.perf_counter()
        await settled(app, job.id)
        if i >= WARMUP_JOBS:
            samples.append(seen - start)
    return samples


async def spawn_latency(app: App, n: int) -> list[float]:
    """The runner alone: spawn → first stdout line, as a job's process would be started."""
    runner = the_runner(app)
    target = app.config.targets["hello"]
    assert target.command is not None and target.cwd is not None
    program = shutil.which(target.command[0])
    assert program is not None
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    samples = []
    for i in range(WARMUP_JOBS + n):
        launch = Launch(argv=[program, *target.command[1:]], cwd=target.cwd, env=env,
                        job_id=f"spawn-{i}", limits=app.config.queue.limits)
        start = time.perf_counter()
        started = await runner.spawn(launch)
        assert started.process.stdout is not None
        line = await started.process.stdout.readline()
        seen = time.perf_counter()
        returncode = await started.process.wait()
        await started.close()
        if NEEDLE not in line.decode() or returncode != 0:
            raise RuntimeError(f"spawn alone: {line!r}, exit code {returncode}")
        if i >= WARMUP_JOBS:
            samples.append(seen - start)
    return samples


# -- 2. throughput -------------------------------------------------------------------------------


async def throughput(app: App, n: int) -> float:
    specs = [app.targets.spec("true")] * n
    start = time.perf_counter()
    await app.queue.enqueue_many(specs)
    deadline = time.monotonic() + TIMEOUT_S
    while await app.store.list_jobs([Status.PENDING, Status.PROCESSING], limit=1):
        if time.monotonic() > deadline:
            raise RuntimeError(f"throughput: jobs still running after {TIMEOUT_S}s")
        await asyncio.sleep(POLL_S)
    seconds = time.perf_counter() - start
    completed = await app.store.list_jobs([Status.COMPLETED], limit=n + 1000)
    done = sum(job.type == COMMAND_TYPE and job.data.get("target") == "true"
               for job in completed)
    if done != n:
        failed = await app.store.list_jobs([Status.FAILED], limit=1)
        why = f" (e.g. {failed[0].error})" if failed else ""
        raise RuntimeError(f"throughput: {done} of {n} jobs completed{why}")
    return seconds


# -- one mode, one round -------------------------------------------------------------------------


async def _one(mode: str, directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    app = App(make_config(directory, MODES[mode], args.workers))
    try:
        await app.start()
    except ConfigError as exc:
        raise CannotContain(str(exc)) from None
    try:
        runner = the_runner(app)
        expected = SandboxRunner if mode == "contained" else GroupRunner
        if not isinstance(runner, expected):
            raise CannotContain(f"{mode} run got {type(runner).__name__}: "
                                f"{runner.enforcement.mechanism}")
        latency = await start_latency(app, args.latency_jobs)
        spawn = await spawn_latency(app, args.latency_jobs)
        seconds = await throughput(app, args.jobs)
    finally:
        await app.stop()
    return {"latency": latency, "spawn": spawn, "seconds": seconds,
            "mechanism": runner.enforcement.mechanism}


def run_one(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"mj-bench-{mode}-", dir=args.dir) as tmp:
        return asyncio.run(_one(mode, Path(tmp), args))


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description="bubblewrap containment vs none: job start latency and jobs/s")
    parser.add_argument("--latency-jobs", type=int, default=50,
                        help="sequential jobs timed per mode and round")
    parser.add_argument("--jobs", type=int, default=500,
                        help="jobs enqueued at once for throughput, per mode and round")
    parser.add_argument("--workers", type=int, default=4, help="[queue] workers")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds, alternating which mode goes first")
    parser.add_argument("--dir", default=None,
                        help="parent of the temporary directories (default: system temp dir)")
    args = parser.parse_args()
    if min(args.latency_jobs, args.jobs, args.workers, args.rounds) < 1:
        parser.error("--latency-jobs, --jobs, --workers and --rounds must be positive")
    logging.basicConfig(level=logging.WARNING)
    # The uncontained mode's "jobs are NOT contained" warning, once per App: it is the point.
    logging.getLogger("matrixjobs.app").setLevel(logging.ERROR)

    modes = tuple(MODES)
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for round_ in range(args.rounds):
        for mode in (modes if round_ % 2 == 0 else modes[::-1]):
            try:
                result = run_one(mode, args)
            except CannotContain as exc:
                print(f'containment = "bubblewrap" cannot run here, so there is no contained '
                      f"figure: {exc}", file=sys.stderr)
                sys.exit(2)
            results[mode].append(result)
            lat = [s * 1000 for s in result["latency"]]
            print(f"  round {round_ + 1} {mode:<11}: start p50 {percentile(lat, 50):6.2f} ms, "
                  f"p99 {percentile(lat, 99):6.2f} ms; {args.jobs} x true in "
                  f"{result['seconds']:6.3f} s = {args.jobs / result['seconds']:6.1f} jobs/s",
                  flush=True)

    figures: dict[str, dict[str, float]] = {}
    for mode, rounds in results.items():
        latency = [s * 1000 for r in rounds for s in r["latency"]]
        spawn = [s * 1000 for r in rounds for s in r["spawn"]]
        figures[mode] = {
            "p50": percentile(latency, 50), "p99": percentile(latency, 99),
            "spawn_p50": percentile(spawn, 50), "spawn_p99": percentile(spawn, 99),
            "jobs_s": args.jobs / statistics.median(r["seconds"] for r in rounds),
        }
    contained, uncontained = figures["contained"], figures["uncontained"]
    added = contained["p50"] - uncontained["p50"]
    added_spawn = contained["spawn_p50"] - uncontained["spawn_p50"]
    ratio = contained["jobs_s"] / uncontained["jobs_s"]
    mechanism = results["contained"][0]["mechanism"]
    samples = args.latency_jobs * args.rounds
    print(f"contained by: {mechanism}")
    print(f"uncontained:  {results['uncontained'][0]['mechanism']}")
    print(f"start latency, submit -> first output line ({samples} sequential jobs per mode):")
    for mode in modes:
        f = figures[mode]
        print(f"  {mode:<11}: p50 {f['p50']:6.2f} ms  p99 {f['p99']:6.2f} ms   "
              f"(spawn alone: p50 {f['spawn_p50']:6.2f} ms  p99 {f['spawn_p99']:6.2f} ms)")
    print(f"  added per job at p50: {added:+.2f} ms (goal <= {LATENCY_GOAL_MS:g} ms: "
          f"{'met' if added <= LATENCY_GOAL_MS else 'NOT met'}); "
          f"of which spawn alone: {added_spawn:+.2f} ms")
    print(f"throughput, {args.jobs} x true, {args.workers} workers "
          f"(median of {args.rounds} round(s)):")
    for mode in modes:
        print(f"  {mode:<11}: {figures[mode]['jobs_s']:7.1f} jobs/s")
    print(f"  ratio contained/uncontained: {ratio:.3f} (goal >= {RATIO_GOAL:g}: "
          f"{'met' if ratio >= RATIO_GOAL else 'NOT met'})")
    print(json.dumps({
        "contained_p50_ms": round(contained["p50"], 3),
        "uncontained_p50_ms": round(uncontained["p50"], 3),
        "added_p50_ms": round(added, 3),
        "contained_p99_ms": round(contained["p99"], 3),
        "uncontained_p99_ms": round(uncontained["p99"], 3),
        "contained_jobs_s": round(contained["jobs_s"], 1),
        "uncontained_jobs_s": round(uncontained["jobs_s"], 1),
        "ratio": round(ratio, 3),
        "contained_spawn_p50_ms": round(contained["spawn_p50"], 3),
        "uncontained_spawn_p50_ms": round(uncontained["spawn_p50"], 3),
        "mechanism": mechanism,
        "latency_jobs": args.latency_jobs,
        "jobs": args.jobs,
        "workers": args.workers,
        "rounds": args.rounds,
    }))


if __name__ == "__main__":
    main()

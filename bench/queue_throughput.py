"""End-to-end queue throughput: matrixjobs vs huey's SqliteHuey, both durable SQLite.

Each side gets a fresh database file in a temporary directory, N trivial jobs
are enqueued and run to completion, and the clock runs from just before the
first enqueue until every job is done.

ours   App with the default
       store settings (WAL, synchronous=FULL: one fsync per
       commit), `--workers` concurrent workers, jobs enqueued with
       `queue.enqueue_many` in chunks of `--chunk` (one commit per chunk). The
       workers are running from `app.start()`, so processing overlaps enqueueing.
       "Done" means every job's `completed` outcome is committed to the store,
       detected with `--wait`:
         poll       (default) the handler counts its runs; once all N have run, the
                    store is polled every 1 ms (`list_jobs([pending, processing])`)
                    until nothing is left. Costs nothing while jobs run, adds at
                    most ~1 ms at the end.
         subscribe  count terminal events from `app.monitor.subscribe()`. Having a
                    subscriber makes the monitor build ~3 events per job, which
                    the default run does not pay, so this is slower (a measure of
                    that cost).
nologs the same with job logs off ([logs] max_bytes = 0): log capture's cost is the
       ratio of the two (printed as "with/without job logs"), the figure the target is for.
line, line_nologs
       the same two, but each job writes one line of output, so each keeps a log that is
       stored with its outcome: what keeping logs costs when there is output (a figure
       beside the target, not compared with huey, whose tasks write nothing).
huey   SqliteHuey defaults (WAL, SQLite's default synchronous, FULL here: checked and
       printed), one task call per job (huey has no bulk enqueue), then one
       worker thread running huey's own `Worker.loop` (from
       `create_consumer(workers=1, worker_type='thread')`, with 1 ms polling so
       it never sleeps long). Only the worker thread is started: no scheduler
       or signal handlers. "Done" = the task body ran N times (huey dequeues,
       i.e. deletes, the task in a committed transaction before running it, and
       keeps no completion record for a None result).

Usage: python bench/queue_throughput.py [--jobs 10000] [--workers 4] [--chunk 500]
                                        [--rounds 1] [--wait poll|subscribe] [--dir DIR]

The last line printed is JSON only:
  {"ours": jobs/s, "anchor": huey jobs/s, "ratio": ours/anchor,
   "ours_without_logs": jobs/s, "logs_ratio": ours/ours_without_logs, "jobs": N, ...}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from huey import SqliteHuey

from matrixjobs.app import App
from matrixjobs.config import Config
from matrixjobs.models import Job, JobSpec, Status
from matrixjobs.progress.reporter import ProgressReporter
from matrixjobs.queue.handlers import HandlerRegistry

POLL_S = 0.001
TIMEOUT_S = 600.0


class NoopHandler:
    """Trivial handler; counts its runs and says when the N-th one has run."""

    def __init__(self, expected: int, writes: bool) -> None:
        self.expected = expected
        self.writes = writes
        self.runs = 0
        self.all_ran = asyncio.Event()

    async def run(self, job: Job, progress: ProgressReporter) -> None:
        if self.writes:
            progress.log(f"{job.id} ran\n")  # one line of output: a log to keep per job
        self.runs += 1
        if self.runs >= self.expected:
            self.all_ran.set()
        return None


# -- ours ----------------------------------------------------------------------------------------


async def _ours(n: int, workers: int, chunk: int, directory: Path, wait: str,
                logs: bool, writes: bool) -> dict[str, Any]:
    config = Config.model_validate({
        "store": {"path": str(directory / "mj.db")},
        "queue": {"workers": workers},
        **({} if logs else {"logs": {"max_bytes": 0}}),
    })
    assert config.store.synchronous == "full"
    handler = NoopHandler(n, writes)
    registry = HandlerRegistry()
    registry.register("noop", handler)
    app = App(config, handlers=registry)
    await app.start()
    try:
        async with app.store.db.execute("PRAGMA synchronous") as cursor:  # type: ignore[attr-defined]
            row = await cursor.fetchone()
        synchronous = None if row is None else row[0]

        subscription = app.monitor.subscribe() if wait == "subscribe" else None
        terminal = 0
        spec = JobSpec(type="noop", data={}, name="noop")

        async def count_terminal() -> None:
            nonlocal terminal
            assert subscription is not None
            async for event in subscription:
                if event.terminal:
                    terminal += 1
                    if terminal >= n:
                        return
            raise RuntimeError(f"subscription ended early after {terminal} terminal events")

        counter = asyncio.create_task(count_terminal()) if subscription else None

        start = time.perf_counter()
        for offset in range(0, n, chunk):
            await app.queue.enqueue_many([spec] * min(chunk, n - offset))
        enqueued = time.perf_counter()
        if counter is not None:
            await asyncio.wait_for(counter, TIMEOUT_S)
        else:
            await asyncio.wait_for(handler.all_ran.wait(), TIMEOUT_S)
            while await app.store.list_jobs([Status.PENDING, Status.PROCESSING], limit=1):
                await asyncio.sleep(POLL_S)
        done = time.perf_counter()
        if subscription is not None:
            subscription.close()

        completed = len(await app.store.list_jobs([Status.COMPLETED], limit=n + 1))
    finally:
        await app.stop()
    if completed != n or handler.runs != n:
        raise RuntimeError(f"ours: {completed} completed, {handler.runs} runs, expected {n}")
    return {"seconds": done - start, "enqueue_s": enqueued - start,
            "synchronous": synchronous}


def run_ours(n: int, workers: int, chunk: int, base: str | None, wait: str,
             logs: bool = True, writes: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mj-bench-", dir=base) as tmp:
        return asyncio.run(_ours(n, workers, chunk, Path(tmp), wait, logs, writes))


# -- huey ----------------------------------------------------------------------------------------


def run_huey(n: int, base: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="huey-bench-", dir=base) as tmp:
        huey = SqliteHuey(filename=str(Path(tmp) / "huey.db"))
        synchronous = huey.storage.sql("PRAGMA synchronous", results=True)[0][0]
        journal = huey.storage.sql("PRAGMA journal_mode", results=True)[0][0]
        lock = threading.Lock()
        all_ran = threading.Event()
        runs = 0

        @huey.task()
        def noop() -> None:
            nonlocal runs
            with lock:
                runs += 1
                if runs >= n:
                    all_ran.set()

        consumer = huey.create_consumer(
            workers=1, worker_type="thread", periodic=False,
            initial_delay=POLL_S, max_delay=POLL_S, backoff=1.0, check_worker_health=False,
        )
        _, worker_thread = consumer.worker_threads[0]
        try:
            start = time.perf_counter()
            for _ in range(n):
                noop()
            enqueued = time.perf_counter()
            worker_thread.start()
            if not all_ran.wait(TIMEOUT_S):
                raise RuntimeError(f"huey: only {runs} of {n} tasks ran in {TIMEOUT_S}s")
            done = time.perf_counter()
        finally:
            consumer.stop_flag.set()
            if worker_thread.is_alive():
                worker_thread.join()
            huey.storage.close()
        left = huey.storage.queue_size()
        huey.storage.close()
        if runs != n or left:
            raise RuntimeError(f"huey: {runs} runs, {left} left in queue, expected {n}")
    return {"seconds": done - start, "enqueue_s": enqueued - start,
            "synchronous": synchronous, "journal_mode": journal}


# -- main ----------------------------------------------------------------------------------------


SYNC_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


def main() -> None:
    parser = argparse.ArgumentParser(description="matrixjobs vs SqliteHuey, jobs/s end to end")
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs per side per round")
    parser.add_argument("--workers", type=int, default=4, help="matrixjobs workers")
    parser.add_argument("--chunk", type=int, default=500, help="jobs per enqueue_many call")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds, alternating which side goes first; medians reported")
    parser.add_argument("--wait", choices=("poll", "subscribe"), default="poll",
                        help="how ours detects completion (see module doc)")
    parser.add_argument("--dir", default=None,
                        help="parent of the temporary database directories "
                             "(default: the system temp dir)")
    args = parser.parse_args()
    if min(args.jobs, args.workers, args.chunk, args.rounds) < 1:
        parser.error("--jobs, --workers, --chunk and --rounds must be positive")
    logging.basicConfig(level=logging.WARNING)
    n: int = args.jobs

    sides = ("ours", "nologs", "huey", "line", "line_nologs")
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for round_ in range(args.rounds):
        order = sides if round_ % 2 == 0 else sides[::-1]
        for side in order:
            if side == "huey":
                result = run_huey(n, args.dir)
            else:
                result = run_ours(n, args.workers, args.chunk, args.dir, args.wait,
                                  logs=side in ("ours", "line"), writes=side.startswith("line"))
            results[side].append(result)
            print(f"  round {round_ + 1} {side:<11}: {result['seconds']:7.3f} s "
                  f"({n / result['seconds']:8.0f} jobs/s; enqueue phase "
                  f"{result['enqueue_s']:.3f} s)", flush=True)

    seconds = {side: statistics.median(r["seconds"] for r in rs) for side, rs in results.items()}
    enqueue = {side: statistics.median(r["enqueue_s"] for r in rs) for side, rs in results.items()}
    rate = {side: n / s for side, s in seconds.items()}
    ratio = rate["ours"] / rate["huey"]
    logs_ratio = rate["ours"] / rate["nologs"]
    line_ratio = rate["line"] / rate["line_nologs"]
    ours_sync = results["ours"][0]["synchronous"]
    huey_sync = results["huey"][0]["synchronous"]
    print(f"{n:,} jobs, median of {args.rounds} round(s):")
    print(f"  matrixjobs ({args.workers} workers, enqueue_many x{args.chunk}, "
          f"synchronous={SYNC_NAMES.get(ours_sync, ours_sync)}, wait={args.wait}): "
          f"{seconds['ours']:.3f} s = {rate['ours']:,.0f} jobs/s")
    print(f"  SqliteHuey (1 thread worker, journal={results['huey'][0]['journal_mode']}, "
          f"synchronous={SYNC_NAMES.get(huey_sync, huey_sync)}): "
          f"{seconds['huey']:.3f} s = {rate['huey']:,.0f} jobs/s")
    print(f"  matrixjobs without job logs ([logs] max_bytes = 0): {seconds['nologs']:.3f} s = "
          f"{rate['nologs']:,.0f} jobs/s")
    print(f"  ratio ours/huey: {ratio:.2f}x  (target >= 3)")
    print(f"  ratio with/without job logs: {logs_ratio:.3f}  (target >= 0.9)")
    print(f"  each job writing one line: {rate['line']:,.0f} jobs/s with logs, "
          f"{rate['line_nologs']:,.0f} without: ratio {line_ratio:.3f}")
    print(json.dumps({
        "ours": round(rate["ours"], 1),
        "anchor": round(rate["huey"], 1),
        "ratio": round(ratio, 3),
        "ours_without_logs": round(rate["nologs"], 1),
        "logs_ratio": round(logs_ratio, 3),
        "one_line_logs_ratio": round(line_ratio, 3),
        "jobs": n,
        "workers": args.workers,
        "chunk": args.chunk,
        "rounds": args.rounds,
        "wait": args.wait,
        "ours_s": round(seconds["ours"], 4),
        "anchor_s": round(seconds["huey"], 4),
        "ours_enqueue_s": round(enqueue["ours"], 4),
        "anchor_enqueue_s": round(enqueue["huey"], 4),
        "ours_synchronous": ours_sync,
        "anchor_synchronous": huey_sync,
    }))


if __name__ == "__main__":
    main()

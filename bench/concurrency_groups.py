"""What concurrency groups cost jobs that are in none: ungrouped throughput, side by side.

Each round runs the same N no-op handler jobs (no group) on a fresh store, twice:

plain    a config with no target in a concurrency group: the claim is as before groups
         (on PostgreSQL no free-groups statement is sent at all). One job in no group
         holds a worker for the whole run.
grouped  a config with a grouped target, and a busy group beside the N jobs: one grouped
         job holds group "g" (and a worker) for the whole run and `--waiting` more wait
         behind it, so every claim takes its grouped path (SQLite: the grouped arm of the
         claim; PostgreSQL: the free-groups statement under the advisory lock, then the
         claim).

Both hold one worker with a long job because that alone changes the figure a lot (with
4 workers a long job beside no-op jobs costs most of their throughput, groups or not);
holding one on both sides leaves only what groups cost.

jobs/s = N / (enqueue of the first chunk → the last of the N jobs committed completed).
The ratio grouped/plain is the figure: 1.0 means groups cost ungrouped jobs nothing.
Each round runs one plain and one grouped run back to back, which goes first taking
turns. The figure is the median of the rounds' own ratios, not the ratio of the two
medians: on a shared machine the load drifts by more than the effect between rounds
(±15 % and more), and two adjacent runs see nearly the same load, so a round's ratio
cancels the drift and the median drops the round a burst of load hit on one side only.

Usage: python bench/concurrency_groups.py [--jobs 5000] [--workers 4] [--waiting 1000]
           [--rounds 5] [--backend sqlite|postgresql] [--url postgresql://127.0.0.1:5432]
           [--kinds plain,grouped]

The last line printed is JSON only: {"plain": jobs/s, "grouped": jobs/s, "ratio": …}
(plain and grouped: the medians of their runs; ratio: the median of the rounds' ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from matrixjobs.app import App
from matrixjobs.config import Config
from matrixjobs.models import Job, JobSpec, Status
from matrixjobs.progress.reporter import ProgressReporter
from matrixjobs.queue.handlers import HandlerRegistry

CHUNK = 500
POLL_S = 0.002
TIMEOUT_S = 600.0
SERVER = "postgresql://127.0.0.1:5432"


class Counting:
    """A no-op that says when the N-th run is done."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.runs = 0
        self.all_ran = asyncio.Event()

    async def run(self, job: Job, progress: ProgressReporter) -> None:
        self.runs += 1
        if self.runs >= self.expected:
            self.all_ran.set()


class Holding:
    """Holds its group until the run ends (its job is cancelled by the stop)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def run(self, job: Job, progress: ProgressReporter) -> None:
        await self.release.wait()


def config(directory: Path, workers: int, grouped: bool, url: str | None) -> Config:
    store: dict[str, Any] = {"path": str(directory / "mj.db")}
    if url is not None:
        store |= {"backend": "postgresql", "url": url}
    targets = {"deploy": {"command": ["true"], "concurrency": "g"}} if grouped else {}
    return Config.model_validate({"store": store, "queue": {"workers": workers},
                                  "logs": {"max_bytes": 0}, "api": {"enabled": False},
                                  "targets": targets})


async def one_run(n: int, workers: int, waiting: int, grouped: bool, url: str | None
                  ) -> float:
    with tempfile.TemporaryDirectory(prefix="mj-groups-") as tmp:
        counting, holding = Counting(n), Holding()
        registry = HandlerRegistry()
        registry.register("noop", counting)
        registry.register("hold", holding)
        app = App(config(Path(tmp), workers, grouped, url), handlers=registry)
        await app.start()
        try:
            # No concurrency keyword for the plain run: it also runs on matrixjobs from
            # before groups (PYTHONPATH=an older checkout), the A/B that says "unchanged".
            hold = JobSpec(type="hold", data={}, name="hold",
                           **({"concurrency": "g"} if grouped else {}))
            await app.queue.enqueue_many([hold] * (1 + (waiting if grouped else 0)))
            while not await app.store.list_jobs([Status.PROCESSING], limit=1):
                await asyncio.sleep(POLL_S)
            spec = JobSpec(type="noop", data={}, name="noop")
            start = time.perf_counter()
            for offset in range(0, n, CHUNK):
                await app.queue.enqueue_many([spec] * min(CHUNK, n - offset))
            await asyncio.wait_for(counting.all_ran.wait(), TIMEOUT_S)
            while len(await app.store.list_jobs([Status.COMPLETED], limit=n + 1)) < n:
                await asyncio.sleep(POLL_S)
            seconds = time.perf_counter() - start
        finally:
            holding.release.set()
            await app.stop()
    return n / seconds


def fresh_database(server: str) -> tuple[str, str]:
    name = f"mj_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, f"{server}/{name}"


def drop_database(server: str, name: str) -> None:
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def measure(args: argparse.Namespace, grouped: bool) -> float:
    if args.backend == "sqlite":
        return asyncio.run(one_run(args.jobs, args.workers, args.waiting, grouped, None))
    name, url = fresh_database(args.url)
    try:
        return asyncio.run(one_run(args.jobs, args.workers, args.waiting, grouped, url))
    finally:
        drop_database(args.url, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--waiting", type=int, default=1000,
                        help="grouped jobs waiting behind the busy group")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--url", default=SERVER, help="the PostgreSQL server (no database)")
    parser.add_argument("--kinds", default="plain,grouped",
                        help="which runs: plain (also on an older matrixjobs), grouped")
    args = parser.parse_args()
    kinds = [kind for kind in ("plain", "grouped") if kind in args.kinds.split(",")]
    logging.basicConfig(level=logging.WARNING)
    results: dict[str, list[float]] = {kind: [] for kind in kinds}
    for round_ in range(1, args.rounds + 1):
        for kind in kinds if round_ % 2 else kinds[::-1]:
            rate = measure(args, kind == "grouped")
            results[kind].append(rate)
            print(f"  round {round_} {kind:8} {rate:8.0f} jobs/s", flush=True)
    if kinds != ["plain", "grouped"]:
        print(json.dumps({kind: round(statistics.median(rates), 1)
                          for kind, rates in results.items()}))
        return
    plain, grouped = (statistics.median(results[kind]) for kind in ("plain", "grouped"))
    ratio = statistics.median(g / p for p, g in zip(results["plain"], results["grouped"],
                                                    strict=True))
    print(f"{args.jobs} ungrouped no-op jobs, {args.workers} workers, {args.backend}, median "
          f"of {args.rounds}: plain {plain:.0f} jobs/s, with a busy group and "
          f"{args.waiting} waiting {grouped:.0f} jobs/s, ratio {ratio:.2f} (median of the "
          "rounds' ratios)")
    print(json.dumps({"plain": round(plain, 1), "grouped": round(grouped, 1),
                      "ratio": round(ratio, 3), "backend": args.backend,
                      "jobs": args.jobs, "workers": args.workers, "waiting": args.waiting,
                      "rounds": args.rounds}))


if __name__ == "__main__":
    main()

"""The jobs of bench/pg_throughput.py, as matrixjobs handlers (`[handlers]` in its configs).

Imported by the `matrixjobs` processes the bench starts (bench/ is on their
PYTHONPATH); bench/pg_procrastinate.py gives procrastinate the same jobs.
"""

from __future__ import annotations

import asyncio
import os
import time

from matrixjobs.models import Job
from matrixjobs.progress.reporter import ProgressReporter

STAMPS_ENV = "BENCH_STAMPS"
TICK_S = 0.2


def record_start(key: str, started: float) -> None:
    """Append `key started` to the file named by $BENCH_STAMPS: one short O_APPEND write,
    whole lines even with several processes writing."""
    with open(os.environ[STAMPS_ENV], "a", encoding="ascii") as out:
        out.write(f"{key} {started!r}\n")


class Noop:
    async def run(self, job: Job, progress: ProgressReporter) -> None:
        return None


class Stamp:
    """Records when it started; its one argument names the job."""

    async def run(self, job: Job, progress: ProgressReporter) -> None:
        record_start(job.data["args"][0], time.time())


class Ticker:
    """Runs for its argument's seconds, reporting its wall clock as the progress message
    every TICK_S, so a subscriber can tell how old a progress event is."""

    async def run(self, job: Job, progress: ProgressReporter) -> None:
        steps = max(1, round(float(job.data["args"][0]) / TICK_S))
        for step in range(1, steps + 1):
            progress.report(step, steps, repr(time.time()))
            await asyncio.sleep(TICK_S)

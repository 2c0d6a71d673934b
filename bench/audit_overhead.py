"""What the audit log costs the queue: jobs submitted and run through `App.submit` with a
caller (each start recorded in the audit chain, in the same transaction) against the same
without one (the core's own submits: no record), on the default SQLite store (WAL,
synchronous=FULL).

Goal (issue #19): with auditing on, at least 0.9x the throughput without it.

Each round starts a fresh store, submits `--jobs` trivial jobs one by one (one commit each,
as people and scripts submit) from `--clients` concurrent submitters while `--workers`
workers run them, and stops the clock once every job's outcome is committed. Rounds
alternate (off, on, on, off, ...) so a noisy neighbour hurts both alike; medians are
compared. The process's CPU time per job is printed beside them: far steadier than
throughput on a shared machine, it shows what the audit adds (hashing, the record's
page in the WAL).

Usage: python bench/audit_overhead.py [--jobs 1200] [--clients 4] [--workers 4] [--rounds 5]

The last line printed is JSON only: {"audited": jobs/s, "anchor": jobs/s without the
audit, "ratio": audited/anchor, "goal_met": ratio >= 0.9, "records": audit records written,
"cpu_us": {"audited": …, "anchor": …} CPU time per job}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from matrixjobs.app import App
from matrixjobs.audit import AuditQuery
from matrixjobs.config import Config
from matrixjobs.models import Status
from matrixjobs.policy import Caller, Place
from matrixjobs.queue.handlers import HandlerRegistry

USER = "@alice:example.org"


class Noop:
    async def run(self, job, reporter):  # type: ignore[no-untyped-def]
        return None


def config(directory: Path, workers: int) -> Config:
    return Config.model_validate({
        "store": {"path": str(directory / "state" / "jobs.db")},
        "queue": {"workers": workers, "containment": "none"},
        "api": {"enabled": False},
        "access": {"allowed_users": [USER]},
        "targets": {"noop": {"handler": "noop"}},
    })


async def one_round(jobs: int, clients: int, workers: int, audited: bool
                    ) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as directory:
        handlers = HandlerRegistry()
        handlers.register("noop", Noop())
        async with App(config(Path(directory), workers), handlers) as app:
            caller = Caller.in_room(USER, Place("!room:example.org"), "$event")
            per_client = jobs // clients

            async def submit() -> None:
                for _ in range(per_client):
                    await app.submit("noop", caller=caller if audited else None)

            began, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(submit() for _ in range(clients)))
            while await app.store.list_jobs([Status.PENDING, Status.PROCESSING], limit=1):
                await asyncio.sleep(0.001)
            elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
            records = len(await app.audit(AuditQuery(limit=1000)))
        done = per_client * clients
        return done / elapsed, cpu / done * 1e6, records


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rates: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    records = 0
    for round_ in range(args.rounds):
        # off-on, then on-off: a drift over the run (a neighbour's load) falls on both
        for audited in (False, True) if round_ % 2 == 0 else (True, False):
            rate, cpu_us, written = await one_round(args.jobs, args.clients, args.workers,
                                                    audited)
            rates[audited].append(rate)
            cpu[audited].append(cpu_us)
            records = written if audited else records
            print(f"  {'audited' if audited else 'no audit'}: {rate:8.1f} jobs/s, "
                  f"{cpu_us:5.0f} µs CPU a job", flush=True)
    audited, anchor = statistics.median(rates[True]), statistics.median(rates[False])
    cpu_on, cpu_off = statistics.median(cpu[True]), statistics.median(cpu[False])
    print(f"{args.jobs} jobs, {args.clients} submitters, {args.workers} workers, median of "
          f"{args.rounds}: audited {audited:.1f} jobs/s, without {anchor:.1f} jobs/s, ratio "
          f"{audited / anchor:.2f} (goal >= 0.9); CPU a job {cpu_on:.0f} µs audited, "
          f"{cpu_off:.0f} µs without (+{cpu_on - cpu_off:.0f} µs)")
    print(json.dumps({"audited": round(audited, 1), "anchor": round(anchor, 1),
                      "ratio": round(audited / anchor, 3), "goal_met": audited / anchor >= 0.9,
                      "records": records,
                      "cpu_us": {"audited": round(cpu_on, 1), "anchor": round(cpu_off, 1)}}))


if __name__ == "__main__":
    asyncio.run(main())

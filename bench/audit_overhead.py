"""What the audit log costs the queue: jobs submitted and run through `App.submit` with a
caller (each start recorded in the audit chain, in the same transaction) against the same
without one (the core's own submits: no record), on the default SQLite store (WAL,
synchronous=FULL).

Goal (issue #19): with auditing on, at least 0.9x the throughput without it.

Each round starts a fresh store, submits `--jobs` trivial jobs one by one (one commit each,
as people and scripts submit) from `--clients` concurrent submitters while `--workers`
workers run them, and stops the clock once every job's outcome is committed. Rounds
alternate (off, on, off, on, ...) so a noisy neighbour hurts both alike; medians are
compared.

Usage: python bench/audit_overhead.py [--jobs 600] [--clients 4] [--workers 4] [--rounds 3]

The last line printed is JSON only: {"audited": jobs/s, "anchor": jobs/s without the
audit, "ratio": audited/anchor, "goal_met": ratio >= 0.9, "records": audit records written}.
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


async def one_round(jobs: int, clients: int, workers: int, audited: bool) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as directory:
        handlers = HandlerRegistry()
        handlers.register("noop", Noop())
        async with App(config(Path(directory), workers), handlers) as app:
            caller = Caller.in_room(USER, Place("!room:example.org"), "$event")
            per_client = jobs // clients

            async def submit() -> None:
                for _ in range(per_client):
                    await app.submit("noop", caller=caller if audited else None)

            began = time.perf_counter()
            await asyncio.gather(*(submit() for _ in range(clients)))
            while await app.store.list_jobs([Status.PENDING, Status.PROCESSING], limit=1):
                await asyncio.sleep(0.001)
            elapsed = time.perf_counter() - began
            records = len(await app.audit(AuditQuery(limit=1000)))
        return per_client * clients / elapsed, records


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rates: dict[bool, list[float]] = {False: [], True: []}
    records = 0
    for _ in range(args.rounds):
        for audited in (False, True):
            rate, written = await one_round(args.jobs, args.clients, args.workers, audited)
            rates[audited].append(rate)
            records = written if audited else records
            print(f"  {'audited' if audited else 'no audit'}: {rate:8.1f} jobs/s", flush=True)
    audited, anchor = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"{args.jobs} jobs, {args.clients} submitters, {args.workers} workers, median of "
          f"{args.rounds}: audited {audited:.1f} jobs/s, without {anchor:.1f} jobs/s, ratio "
          f"{audited / anchor:.2f} (goal >= 0.9)")
    print(json.dumps({"audited": round(audited, 1), "anchor": round(anchor, 1),
                      "ratio": round(audited / anchor, 3), "goal_met": audited / anchor >= 0.9,
                      "records": records}))


if __name__ == "__main__":
    asyncio.run(main())

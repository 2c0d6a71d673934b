"""One process of the concurrency test (test_store_concurrency.py): a worker that claims,
settles and beats (and now and then "dies", leaving its jobs to recovery), or a client
that adds and cancels batches, cancels jobs and recovers expired leases. Prints the
errors it met, as JSON, when its time is up.

    python tests/store_hammer.py URL worker|client SECONDS SEED
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import sys
import time

from matrixjobs.models import JobSpec, Outcome, Status
from matrixjobs.store.postgres import PostgresStore

LEASE_S = 2.0


def spec() -> JobSpec:
    return JobSpec(type="t", data={}, name="op", max_retries=1, timeout_s=60)


async def worker(store: PostgresStore, owner: str, until: float, errors: collections.Counter[str],
                 rng: random.Random) -> None:
    held: list[str] = []
    while time.time() < until:
        try:
            done = held[:rng.randint(0, len(held))]
            held = held[len(done):]
            cycle = await store.settle_and_claim(
                [Outcome(job, Status.COMPLETED, time.time()) for job in done], owner,
                rng.randint(1, 8), time.time(), LEASE_S, worker=owner)
            held += [job.id for job in cycle.claimed]
            if rng.random() < 0.3:
                beat = await store.heartbeat(owner, {}, time.time(), LEASE_S, held)
                held = [job for job in held if job not in beat.lost]
            if rng.random() < 0.02:
                held = []  # "killed": its jobs are left to recovery
        except Exception as exc:
            errors[f"worker {type(exc).__name__}"] += 1


async def client(store: PostgresStore, until: float, errors: collections.Counter[str],
                 rng: random.Random) -> None:
    batches: list[str] = []
    while time.time() < until:
        choice = rng.random()
        try:
            if choice < 0.4:
                batch, _ = await store.add_batch(
                    "b", [spec() for _ in range(rng.randint(2, 20))], time.time())
                batches.append(batch.id)
            elif choice < 0.7 and batches:
                await store.cancel_batch(rng.choice(batches), time.time())
            elif choice < 0.85:
                jobs = await store.list_jobs([Status.PROCESSING, Status.PENDING], limit=20)
                if jobs:
                    job = rng.choice(jobs)
                    if job.status == Status.PENDING:
                        await store.cancel_pending(job.id, time.time())
                    else:
                        await store.request_cancel(job.id)
            else:
                await store.recover_expired(time.time())
        except Exception as exc:
            errors[f"client {type(exc).__name__}: {exc}"[:200]] += 1


async def main(url: str, role: str, seconds: float, seed: int) -> None:
    errors: collections.Counter[str] = collections.Counter()
    rng = random.Random(seed)
    store = PostgresStore(url)
    await store.open()
    until = time.time() + seconds
    try:
        if role == "worker":
            await worker(store, f"w{seed}", until, errors, rng)
        else:
            await client(store, until, errors, rng)
    finally:
        await store.close()
    print(json.dumps(errors))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])))

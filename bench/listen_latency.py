"""Latency of a wake-up: `notify` on one connection → `Listener`'s callback, on loopback.

One notification at a time: the clock starts before the sending statement (autocommit, so it
commits on its own) and stops in the callback; the next is sent once the previous arrived, so
every one finds the listener idle in `notifies()`, as a worker waiting for a job does.

Usage: python bench/listen_latency.py [--url postgresql://127.0.0.1:5432/test] [--count 1000]

The last line printed is JSON only: {"count": N, "p50_ms": …, "p99_ms": …, "max_ms": …}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import psycopg

from matrixjobs.store.pg_listen import Listener, notify

KIND = "bench"


async def measure(url: str, count: int) -> list[float]:
    arrived: asyncio.Queue[float] = asyncio.Queue()

    def on_message(kind: str, ids: list[str]) -> None:
        if kind == KIND:
            arrived.put_nowait(time.perf_counter())

    listener = Listener(url, on_message, lambda: None)
    task = asyncio.create_task(listener.run())
    try:
        while not listener.connected:
            await asyncio.sleep(0.01)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            latencies = []
            for n in range(count):
                sent = time.perf_counter()
                await notify(conn, KIND, [str(n)])
                latencies.append(await asyncio.wait_for(arrived.get(), 5) - sent)
            return latencies
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://127.0.0.1:5432/test")
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    latencies = asyncio.run(measure(args.url, args.count))
    cuts = statistics.quantiles(latencies, n=100)
    print(json.dumps({"count": len(latencies), "p50_ms": round(cuts[49] * 1000, 3),
                      "p99_ms": round(cuts[98] * 1000, 3),
                      "max_ms": round(max(latencies) * 1000, 3)}))


if __name__ == "__main__":
    main()
